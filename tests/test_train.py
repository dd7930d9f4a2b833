"""End-to-end training through the real config tree (in-process Hydra compose)."""

import csv
import math

import pytest
import torch
from helpers import load_ckpt, run_train, subtree, tiny_overrides

MODELS = ["unet", "dit"]
SDES = ["vp", "vpsub", "ve"]
OBJECTIVES = ["ddpm", "ncsn", "consistency"]


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("sde", SDES)
@pytest.mark.parametrize("model", MODELS)
def test_every_combination_trains(tmp_path, model, sde, objective):
    result = run_train(tmp_path, [*tiny_overrides(model), f"sde={sde}", f"objective={objective}"])
    assert result["global_step"] == 3
    assert math.isfinite(result["loss"])
    ckpt = load_ckpt(tmp_path / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert (tmp_path / "samples" / "step_0000003.png").is_file()
    stored = ckpt["hyper_parameters"]["config"]
    assert stored["sde"]["_target_"].endswith({"vp": "VPSDE", "vpsub": "SubVPSDE", "ve": "VESDE"}[sde])


def _logged_losses(run_dir):
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def test_tiny_run_loss_goes_down(tmp_path):
    run_train(
        tmp_path,
        [*tiny_overrides("unet"), "logger=csv", "trainer.max_steps=150", "data.limit=512", "data.batch_size=64", "optim.lr=1e-3", "optim.warmup_steps=10"],
    )
    losses = _logged_losses(tmp_path)
    assert len(losses) == 150
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.6 * first, (first, last)


def test_bf16_mixed_precision_trains(tmp_path):
    result = run_train(tmp_path, [*tiny_overrides("unet"), "trainer.precision=bf16-mixed"])
    assert math.isfinite(result["loss"])
    ckpt = load_ckpt(tmp_path / "checkpoints" / "last.ckpt")
    # Mixed precision keeps fp32 master weights; the checkpoint holds no bf16 tensors.
    assert all(v.dtype == torch.float32 for k, v in ckpt["state_dict"].items() if v.is_floating_point())


def test_ema_weights_differ_from_raw_and_roundtrip(tmp_path):
    run_train(tmp_path, [*tiny_overrides("unet"), "trainer.max_steps=5", "ema.decay=0.9", "ema.warmup=false"])
    ckpt = load_ckpt(tmp_path / "checkpoints" / "last.ckpt")
    raw, ema = subtree(ckpt["state_dict"], "denoiser."), subtree(ckpt["state_dict"], "ema.")
    assert raw.keys() == ema.keys()
    diffs = [float((raw[k] - ema[k]).abs().max()) for k in raw if raw[k].is_floating_point()]
    assert max(diffs) > 1e-6  # EMA lags the raw weights

    from diffctl.build import load_denoiser

    for use_ema, expected in ((True, ema), (False, raw)):
        denoiser, cfg = load_denoiser(tmp_path, use_ema=use_ema)
        got = denoiser.state_dict()
        assert all(torch.equal(got[k], expected[k]) for k in expected)
        assert cfg.data_shape.channels == 1 and cfg.data_shape.resolution == 8


def test_ema_is_the_exponential_average_of_raw_weights(tmp_path):
    """With decay d and no warmup, after one optimizer step ema = d*init + (1-d)*raw."""
    run_train(tmp_path, [*tiny_overrides("unet"), "trainer.max_steps=1", "ema.decay=0.75", "ema.warmup=false"])
    state = load_ckpt(tmp_path / "checkpoints" / "last.ckpt")["state_dict"]
    raw, ema = subtree(state, "denoiser."), subtree(state, "ema.")
    # Rebuild the initial weights: same seed, same config, no training.
    from diffctl.build import build_denoiser, build_objective, build_sde
    from diffctl.checkpoint import checkpoint_config
    from omegaconf import OmegaConf
    import lightning as L

    cfg = OmegaConf.create(checkpoint_config(load_ckpt(tmp_path / "checkpoints" / "last.ckpt")))
    L.seed_everything(cfg.seed, verbose=False)
    sde = build_sde(cfg)
    init = build_denoiser(cfg, sde, build_objective(cfg, sde), cfg.data_shape).state_dict()
    for k in raw:
        if raw[k].is_floating_point():
            torch.testing.assert_close(ema[k], 0.75 * init[k] + 0.25 * raw[k], rtol=1e-5, atol=1e-6)


def test_resume_continues_step_count_and_optimizer_state(tmp_path):
    first = tmp_path / "first"
    # 128 images / batch 16 = 8 steps per epoch: resume mid-epoch at 6 and cross the epoch boundary.
    run_train(first, [*tiny_overrides("unet"), "trainer.max_steps=12", "checkpoint.every_n_steps=6"])
    step6 = first / "checkpoints" / "step_0000006.ckpt"
    assert step6.is_file()

    resumed = tmp_path / "resumed"
    result = run_train(resumed, [*tiny_overrides("unet"), "trainer.max_steps=12", f"resume={step6}"])
    assert result["global_step"] == 12
    a = load_ckpt(first / "checkpoints" / "last.ckpt")
    b = load_ckpt(resumed / "checkpoints" / "last.ckpt")
    assert b["global_step"] == 12
    adam_a, adam_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert float(adam_b[0]["step"]) == 12  # Adam's step counter continued from 6, not restarted
    # Same data order and noise after resuming: the weights match the uninterrupted run.
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(adam_b[0]["exp_avg_sq"], adam_a[0]["exp_avg_sq"], rtol=1e-5, atol=1e-9)


def test_resume_from_run_dir_takes_model_config_from_checkpoint(tmp_path):
    first = tmp_path / "first"
    run_train(first, [*tiny_overrides("dit"), "sde=ve", "trainer.max_steps=2"])
    # The user only names the run directory; model/sde come from the checkpoint.
    resumed = tmp_path / "resumed"
    result = run_train(resumed, [*tiny_overrides("unet"), "trainer.max_steps=3", f"resume={first}"])
    assert result["global_step"] == 3
    cfg = load_ckpt(resumed / "checkpoints" / "last.ckpt")["hyper_parameters"]["config"]
    assert cfg["model"]["_target_"].endswith("DiT") and cfg["sde"]["_target_"].endswith("VESDE")


def test_class_conditional_training_with_label_dropout(tmp_path):
    run_train(tmp_path, [*tiny_overrides("unet"), "conditional=true", "label_dropout=0.2"])
    cfg = load_ckpt(tmp_path / "checkpoints" / "last.ckpt")["hyper_parameters"]["config"]
    assert cfg["data_shape"]["num_classes"] == 10
    state = load_ckpt(tmp_path / "checkpoints" / "last.ckpt")["state_dict"]
    # The class table has a row for every class plus the null class used for guidance.
    tables = [v for k, v in state.items() if k.startswith("denoiser.") and v.ndim == 2 and v.shape[0] == 11]
    assert tables, "no (num_classes + 1)-row class embedding in the checkpoint"


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    result = run_train(tmp_path, [*tiny_overrides("unet"), "trainer.accumulate_grad_batches=2", "trainer.max_steps=3"])
    assert result["global_step"] == 3
    assert float(load_ckpt(tmp_path / "checkpoints" / "last.ckpt")["optimizer_states"][0]["state"][0]["step"]) == 3


def test_tensorboard_logger_gets_loss_and_sample_grid(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_train(tmp_path, [*tiny_overrides("unet"), "logger=tensorboard"])
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0}).Reload()
    assert "train/loss" in events.Tags()["scalars"]
    assert "samples" in events.Tags()["images"]


def test_wandb_logger_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_train(tmp_path, [*tiny_overrides("unet"), "logger=wandb"])
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_consistency_distillation_from_a_trained_teacher(tmp_path):
    teacher = tmp_path / "teacher"
    run_train(teacher, [*tiny_overrides("unet"), "sde=ve", "trainer.max_steps=2"])
    student = tmp_path / "student"
    result = run_train(
        student,
        [*tiny_overrides("unet"), "sde=ve", "objective=consistency", f"objective.teacher={teacher}",
         "objective.num_scales_start=18", "objective.num_scales_end=18", "objective.target_decay_start=0.95"],
    )
    assert math.isfinite(result["loss"])
    state = load_ckpt(student / "checkpoints" / "last.ckpt")["state_dict"]
    assert any(k.startswith("target.") for k in state)  # the EMA target network is checkpointed


def test_distillation_teacher_with_another_sde_is_refused(tmp_path):
    from diffctl.errors import ConfigError

    teacher = tmp_path / "teacher"
    run_train(teacher, [*tiny_overrides("unet"), "sde=vp", "trainer.max_steps=1"])
    with pytest.raises(ConfigError, match="teacher's SDE"):
        run_train(tmp_path / "student", [*tiny_overrides("unet"), "sde=ve", "objective=consistency", f"objective.teacher={teacher}"])
    assert not (tmp_path / "student" / "checkpoints").exists()


def test_conditional_training_on_unlabelled_data_is_refused(tmp_path):
    from PIL import Image

    from diffctl.errors import ConfigError

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.new("L", (8, 8), color=i * 60).save(folder / f"{i}.png")
    with pytest.raises(ConfigError, match="conditional=true needs class labels"):
        run_train(tmp_path / "run", [*tiny_overrides("unet"), "data=imagefolder", f"data.root={folder}", "conditional=true"])
