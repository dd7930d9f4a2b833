"""What the quickstart prints: `diffctl train` then `diffctl sample`, run as a user would on a narrow
terminal (a pipe, COLUMNS=60): every line once, no advertisements, no placeholder columns or negative
epoch totals, and every path whole and real."""

import json
import re
from pathlib import Path

import torch
from helpers import run_cli
from test_metrics import TinyNet

BOX = set("─━│┃┌┐└┘├┤┬┴┼┏┓┗┛┡┩╇┳┻╋ ")
ABSOLUTE_PATH = re.compile(r"(?:^|\s)(/[^\s,;()'\"]+)")


def _problems(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.splitlines()]
    seen, problems = set(), []
    for line in lines:
        if not line.strip() or set(line) <= BOX or "━━" in line:  # blank, table rules, progress bars
            continue
        if line in seen:
            problems.append(f"printed twice: {line!r}")
        seen.add(line)
    for bad in ("Tip:", "litlogger", "💡", "…", "FLOPs", "Epoch", "/-", "log_every_n_steps", "[INFO]", "Traceback"):
        if bad in text:
            problems.append(f"{bad!r} in the output")
    for path in ABSOLUTE_PATH.findall(text):
        if not Path(path).exists():
            problems.append(f"printed path does not exist (cut?): {path}")
    return problems


def test_quickstart_train_and_sample_print_clean_whole_lines(tmp_path):
    env = {"COLUMNS": "60", "DIFFCTL_CACHE": str(tmp_path / "cache")}
    train = run_cli(["train", "trainer.max_steps=20"], tmp_path, env=env)  # the quickstart, fewer steps
    assert train.returncode == 0, train.stderr[-3000:]
    out = train.stdout + train.stderr
    assert _problems(out) == [], out
    run_dir = next((tmp_path / "outputs" / "train").glob("*/*"))
    assert "step 20/20" in out and "GPU available" in out  # the bar counts optimizer steps; Lightning's lines once
    assert f"checkpoint: {run_dir / 'checkpoints' / 'last.ckpt'}" in out  # the final checkpoint, whole, on one line
    assert "Name" in out and "Params" in out and "parameters: 176 K trainable" in out
    assert "GPU available" in (run_dir / "train.log").read_text()  # the log file keeps Lightning's lines too

    detector = tmp_path / "tiny.pt"
    torch.jit.script(TinyNet(0)).save(str(detector))
    sample = run_cli(["sample", "metrics.detector=torchscript", f"metrics.detector_path={detector}"], tmp_path, env=env)
    assert sample.returncode == 0, sample.stderr[-3000:]
    out = sample.stdout + sample.stderr
    assert _problems(out) == [], out
    sample_dir = next((tmp_path / "outputs" / "sample").glob("*/*"))
    result = json.loads((sample_dir / "metrics.json").read_text())
    # 64 samples: KID with its std in the table, FID withheld (null, with the reason), a bounded reference
    assert result["fid"] is None and result["kid_mean"] is not None and result["ref_num_images"] == 128
    assert "kid (unbiased)" in out and " ± " in out and "withheld" in out
    assert "note: FID withheld: 64 samples < metrics.fid_min_samples=2048" in out
    assert f"metrics: {sample_dir / 'metrics.json'}" in out
