"""The bad-input catalogue (issue 5): each case runs the real CLI and asserts what the user sees:
a short message saying what was wrong and what to do, a non-zero exit, no traceback (unless
HYDRA_FULL_ERROR=1), and nothing written before left damaged."""

import hashlib

import pytest
import torch
from helpers import run_cli

GMM = ["model=gmm", "num_samples=4", "steps=2", "progress_bar=false"]


def _assert_user_error(out, *fragments, code=1, max_lines=1):
    assert out.returncode == code, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert 1 <= len(lines) <= max_lines, out.stderr
    for fragment in fragments:
        assert fragment in out.stderr, (fragment, out.stderr)


CASES = {
    # config groups and keys: Hydra's own messages, several lines (the choices, its search path and
    # its HYDRA_FULL_ERROR hint) but no traceback
    "unknown group choice lists the valid ones": (["train", "model=resnet"], ["model/resnet", "dit", "unet"], 1, 12),
    "misspelled key": (["train", "trainer.max_stepz=3"], ["max_stepz"], 1, 12),
    # ranges and types
    "negative steps": (["sample", *GMM, "steps=-1"], ["steps must be a positive integer"]),
    "num_samples=0": (["sample", *GMM, "num_samples=0"], ["num_samples must be a positive integer"]),
    "eta outside [0, 1]": (["sample", *GMM, "sampler=ddim", "sampler.eta=1.5"], ["sampler.eta must be in [0, 1]"]),
    "unknown sampler option": (["sample", *GMM, "sampler=ddpm", "+sampler.snr=0.1"], ["has no option snr"]),
    "unknown spacing": (["sample", *GMM, "sampler=ode", "sampler.spacing=cosine"], ["sampler.spacing must be one of"]),
    "more devices than samples": (["sample", *GMM, "trainer.devices=8"], ["more than num_samples"]),
    "negative guidance": (["sample", *GMM, "guidance=-1"], ["guidance must be >= 0"]),
    # combinations that cannot work
    "consistency sampler on a diffusion model": (["sample", *GMM, "sampler=consistency"], ["consistency"]),
    "guidance on an unconditional model": (["sample", *GMM, "guidance=3"], ["guidance needs a class-conditional model"]),
    "class label out of range": (["sample", *GMM, "model.conditional=true", "class_label=9"], ["class_label must be in [0, 3]"]),
    "training the analytic model": (["train", "model=gmm"], ["nothing to train"]),
    "leading spacing with too many steps": (["sample", *GMM, "sampler=ddim", "sampler.spacing=leading", "steps=2000"],
                                            ["allows at most 1000 steps"]),
    # missing things
    "checkpoint that does not exist": (["sample", "ckpt=/nonexistent/run.ckpt", "progress_bar=false"], ["checkpoint not found"]),
    "mixture file that does not exist": (["sample", *GMM, "model.file=/nonexistent/mix.yaml"], ["model.file not found"]),
    "likelihood with an unknown trace": (["likelihood", "model=gmm", "num_batches=1", "trace=exactly"], ["trace must be one of"]),
    "unknown command": (["smaple"], ["unknown command 'smaple'"], 2, 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_no_traceback(case, tmp_path):
    args, fragments, *rest = CASES[case]
    code, max_lines = rest if rest else (1, 1)
    _assert_user_error(run_cli(args, tmp_path), *fragments, code=code, max_lines=max_lines)


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_truncated_checkpoint_is_refused_and_left_as_it_was(tmp_path):
    ckpt = tmp_path / "half.ckpt"
    torch.save({"state_dict": {"ema.w": torch.zeros(1000)}, "hyper_parameters": {"config": {}}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:300])
    before = _digest(ckpt)
    _assert_user_error(run_cli(["sample", f"ckpt={ckpt}", "progress_bar=false"], tmp_path), "truncated or not a PyTorch checkpoint")
    assert _digest(ckpt) == before


def test_checkpoint_from_another_tool_is_refused(tmp_path):
    ckpt = tmp_path / "other.pt"
    torch.save({"model": {"w": torch.zeros(3)}}, ckpt)  # e.g. a plain state dict from another trainer
    _assert_user_error(run_cli(["sample", f"ckpt={ckpt}", "progress_bar=false"], tmp_path), "is not a diffctl training checkpoint")


def test_full_error_env_shows_the_traceback(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    out = subprocess.run([sys.executable, "-m", "diffctl", "sample", *GMM, "steps=-1"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "Traceback" in out.stderr and "steps must be a positive integer" in out.stderr
