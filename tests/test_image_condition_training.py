"""Training guarantees for image-to-image models (`diffctl train condition=sr|inpaint`): bitwise resume
mid-epoch (masks and condition dropout keyed by seed, step and sample), DDP over 2 processes equal to
1 process on the same global batch, and EMA weights in the checkpoint."""

import hashlib

import pytest
import torch
from helpers import load_ckpt, run_cli, run_train, subtree, tiny_overrides
from test_train import assert_same_training_state

# 64 images / batch 16 = 4 batches per epoch: resuming at step 6 is mid-epoch.
EXACT = ["data.limit=64", "trainer.max_steps=8", "checkpoint.every_n_steps=2", "ema.decay=0.8", "ema.warmup=false",
         "optim.warmup_steps=2", "trainer.deterministic=true", "sample_grid.every_n_steps=0"]


def _digest(t):
    return hashlib.sha1(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


@pytest.fixture
def record_conds(monkeypatch):
    """For every training step: its step, the batch, and the source the network saw (after dropout)."""
    from diffctl.image_conditions import SOURCE, ImageConditioner
    from diffctl.module import DiffusionModule

    seen, original_drop, original_step = [], ImageConditioner.drop, DiffusionModule.training_step
    current = {}

    def drop(self, cond, rng):
        out = original_drop(self, cond, rng)
        current["source"] = _digest(out[SOURCE])
        return out

    def training_step(self, batch, batch_idx):
        loss = original_step(self, batch, batch_idx)
        seen.append((self.global_step, _digest(batch["image"]), current.pop("source"), _digest(torch.get_rng_state())))
        return loss

    monkeypatch.setattr(ImageConditioner, "drop", drop)
    monkeypatch.setattr(DiffusionModule, "training_step", training_step)
    return seen


@pytest.mark.parametrize("condition", [["condition=inpaint"], ["condition=sr", "condition.dropout=0.5"]])
def test_image_condition_resume_mid_epoch_is_bitwise_exact(tmp_path, record_conds, condition):
    overrides = [*tiny_overrides("unet"), *EXACT, *condition]
    run_train(tmp_path / "full", overrides)
    full = list(record_conds)
    assert [s for s, *_ in full] == list(range(8))
    assert len({src for _, _, src, _ in full}) == 8  # every step saw another source (masks / dropout drawn anew)
    record_conds.clear()
    result = run_train(tmp_path / "resumed", [*overrides, f"resume={tmp_path / 'full' / 'checkpoints' / 'step_0000006.ckpt'}"])
    assert result["global_step"] == 8
    assert record_conds == full[6:], "resumed: different batches, sources (masks, dropout) or RNG state"
    reference = load_ckpt(tmp_path / "full" / "checkpoints" / "last.ckpt")
    assert_same_training_state(reference, load_ckpt(tmp_path / "resumed" / "checkpoints" / "last.ckpt"))
    # EMA: the checkpoint's average lags the raw weights (both compared bitwise above)
    raw, ema = subtree(reference["state_dict"], "denoiser."), subtree(reference["state_dict"], "ema.")
    assert max(float((raw[k] - ema[k]).abs().max()) for k in raw if raw[k].is_floating_point()) > 1e-6


@pytest.mark.slow
def test_inpaint_ddp_two_processes_matches_one_process_on_same_global_batch(tmp_path):
    """2 gloo processes x batch 8 draw the same masks and dropout as 1 process x batch 16."""
    common = [*tiny_overrides("unet"), "condition=inpaint", "condition.dropout=0.3", "trainer.max_steps=4",
              "optim.warmup_steps=0", "optim.lr=1e-3"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    a = run_cli(["train", *common, "data.batch_size=16", f"hydra.run.dir={single}"], tmp_path)
    assert a.returncode == 0, a.stderr[-3000:]
    b = run_cli(["train", *common, "trainer=ddp_cpu", "trainer.devices=2", "data.batch_size=8", f"hydra.run.dir={ddp}"], tmp_path)
    assert b.returncode == 0, b.stderr[-3000:]
    sa = load_ckpt(single / "checkpoints" / "last.ckpt")["state_dict"]
    wa = subtree(sa, "denoiser.")
    wb = subtree(load_ckpt(ddp / "checkpoints" / "last.ckpt")["state_dict"], "denoiser.")
    assert max(float((wa[k] - sa["ema." + k]).abs().max()) for k in wa) > 0  # the weights moved
    for k in wa:  # gradients summed over ranks in another order: equal up to float rounding
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
