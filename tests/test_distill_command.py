"""`diffctl distill`: rounds of progressive distillation as real processes, exact resume mid-round."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch

from helpers import load_ckpt, run_cli

ROUND_TRAIN = ["trainer=cpu", "logger=none", "progress_bar=false", "sample_grid.every_n_steps=0",
               "trainer.enable_model_summary=false", "checkpoint.every_n_steps=1", "optim.warmup_steps=0"]  # fmt: skip


def _overrides() -> str:
    return "train_overrides=[" + ",".join(f"'{o}'" for o in ROUND_TRAIN) + "]"


@pytest.fixture(scope="module")
def distilled(trained, tmp_path_factory):
    root, teacher = trained
    run = tmp_path_factory.mktemp("distill") / "run"
    out = run_cli(["distill", f"ckpt={teacher}", "teacher_steps=8", "rounds=2", "steps_per_round=3", _overrides(),
                   f"hydra.run.dir={run}"], root)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return teacher, run, out


def test_each_round_halves_the_steps_and_learns_from_the_last(distilled):
    teacher, run, out = distilled
    plan = json.loads((run / "distill.json").read_text())
    assert [(r["round"], r["student_steps"]) for r in plan["rounds_done"]] == [(1, 4), (2, 2)]
    first, second = (load_ckpt(run / f"round_{k}" / "checkpoints" / "last.ckpt") for k in (1, 2))
    cfg1, cfg2 = (c["hyper_parameters"]["config"] for c in (first, second))
    assert first["global_step"] == second["global_step"] == 3
    assert cfg1["objective"]["student_steps"] == 4 and cfg2["objective"]["student_steps"] == 2
    assert os.path.samefile(cfg1["objective"]["teacher"], teacher / "checkpoints" / "last.ckpt") or cfg1["objective"]["teacher"] == str(teacher)
    assert cfg2["objective"]["teacher"] == str(run / "round_1")
    assert cfg1["data"] == load_ckpt(teacher / "checkpoints" / "last.ckpt")["hyper_parameters"]["config"]["data"]
    assert "diffctl distill: done" in out.stdout and "round 2:" in out.stdout
    # round 2 started from round 1's EMA weights, not from the original teacher's
    start = torch.load(run / "round_2" / "checkpoints" / "step_0000001.ckpt", weights_only=True)["state_dict"]
    ema1 = {k[4:]: v for k, v in first["state_dict"].items() if k.startswith("ema.")}
    raw2 = {k[9:]: v for k, v in start.items() if k.startswith("denoiser.")}
    close = sum(torch.allclose(raw2[k], ema1[k], atol=1e-2) for k in ema1)
    assert close == len(ema1)  # one Adam step (lr 1e-3) from round 1's EMA


def test_resume_continues_the_interrupted_round_bitwise(distilled, tmp_path):
    """A run stopped after step 1 of round 2 (its last.ckpt then links step 1, later files absent)
    continues with `distill resume=` to the same weights as the run that never stopped."""
    teacher, run, _ = distilled
    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    ckpts = copy / "round_2" / "checkpoints"
    for f in ckpts.iterdir():
        if f.name != "step_0000001.ckpt":
            f.unlink()
    os.link(ckpts / "step_0000001.ckpt", ckpts / "last.ckpt")
    (copy / "round_2" / "train_summary.json").unlink()
    out = run_cli(["distill", f"resume={copy}", f"hydra.run.dir={tmp_path / 'log'}"], copy.parent)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "round 1/2: done" in out.stdout
    want = load_ckpt(run / "round_2" / "checkpoints" / "last.ckpt")
    got = load_ckpt(ckpts / "last.ckpt")
    assert got["global_step"] == 3
    for k, v in want["state_dict"].items():
        assert torch.equal(got["state_dict"][k], v), k


@pytest.mark.parametrize("overrides, message", [
    (["ckpt=TEACHER", "teacher_steps=6", "rounds=2"], "teacher_steps must be divisible by 2^rounds = 4 (each round halves"),
    ([], "ckpt must name the teacher"),
    (["resume=TMP"], "not a `diffctl distill` run directory (no distill.json)"),
])
def test_bad_plans_are_refused_before_any_work(trained, tmp_path, overrides, message):
    from diffctl.config import compose_config
    from diffctl.distill import distill
    from diffctl.errors import ConfigError

    _, teacher = trained
    overrides = [o.replace("TEACHER", str(teacher)).replace("TMP", str(tmp_path)) for o in overrides]
    with pytest.raises(ConfigError, match=re.escape(message)):
        distill(compose_config("distill", overrides, tmp_path / "run"))
    assert not (tmp_path / "run" / "round_1").exists() and not (tmp_path / "run" / "distill.json").exists()
