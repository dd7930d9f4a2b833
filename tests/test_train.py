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


def test_loss_reaches_loggers_and_summary_though_not_logged_every_step(tmp_path):
    """The loss is logged only on steps something reads it (self.log costs ~1 ms): the logger's rows
    and the final loss are those of a run that logs every step."""
    base = [*tiny_overrides("unet"), "logger=csv", "trainer.max_steps=10", "trainer.deterministic=true"]
    every = run_train(tmp_path / "every", [*base, "trainer.log_every_n_steps=1"])
    sparse = run_train(tmp_path / "sparse", [*base, "trainer.log_every_n_steps=4"])

    def rows(run_dir):
        with open(run_dir / "csv" / "metrics.csv") as f:
            return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}

    all_steps, logged = rows(tmp_path / "every"), rows(tmp_path / "sparse")
    assert sorted(all_steps) == list(range(10)) and sorted(logged) == [3, 7]
    assert all(logged[k] == pytest.approx(all_steps[k], rel=1e-6) for k in logged)
    assert sparse["loss"] == pytest.approx(all_steps[9], rel=1e-6) == every["loss"]


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
    """With decay d and no warmup, after optimizer steps 1..n: ema_n = d*ema_(n-1) + (1-d)*raw_n, ema_0 = init."""
    run_train(tmp_path, [*tiny_overrides("unet"), "trainer.max_steps=3", "checkpoint.every_n_steps=1",
                         "ema.decay=0.75", "ema.warmup=false"])
    states = [load_ckpt(tmp_path / "checkpoints" / f"step_{n:07d}.ckpt")["state_dict"] for n in (1, 2, 3)]
    # Rebuild the initial weights: same seed, same config, no training.
    from diffctl.build import build_denoiser, build_objective, build_sde
    from diffctl.checkpoint import checkpoint_config
    from omegaconf import OmegaConf
    import lightning as L

    cfg = OmegaConf.create(checkpoint_config(load_ckpt(tmp_path / "checkpoints" / "last.ckpt")))
    L.seed_everything(cfg.seed, verbose=False)
    sde = build_sde(cfg)
    expected = build_denoiser(cfg, sde, build_objective(cfg, sde), cfg.data_shape).state_dict()
    for state in states:  # the average keeps following the live weights at every step
        raw, ema = subtree(state, "denoiser."), subtree(state, "ema.")
        expected = {k: 0.75 * expected[k] + 0.25 * raw[k] if raw[k].is_floating_point() else raw[k] for k in raw}
        for k in raw:
            torch.testing.assert_close(ema[k], expected[k], rtol=1e-5, atol=1e-6)


# --- exact resume -------------------------------------------------------------------------
# 128 images / batch 16 = 8 batches per epoch. Dropout, random flips and a fast EMA make every
# source of randomness and every piece of state matter; deterministic kernels make CPU runs bitwise.
EXACT = [
    "trainer.max_steps=20",
    "checkpoint.every_n_steps=4",
    "model.dropout=0.2",
    "data.random_flip=true",
    "ema.decay=0.8",
    "ema.warmup=false",
    "optim.warmup_steps=3",
    "trainer.deterministic=true",
]


@pytest.fixture
def record_steps(monkeypatch):
    """Record, for every training step, what it saw: data (before flips), and global RNG state after it."""
    import hashlib

    from diffctl.module import DiffusionModule

    seen = []
    original = DiffusionModule.training_step

    def training_step(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        digest = lambda t: hashlib.sha1(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]  # noqa: E731
        seen.append((self.global_step, batch_idx, digest(batch[0]), digest(torch.get_rng_state())))
        return loss

    monkeypatch.setattr(DiffusionModule, "training_step", training_step)
    return seen


def assert_same_training_state(a: dict, b: dict) -> None:
    """Bitwise: step count, raw and EMA weights, optimizer state, LR schedule."""
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert any(k.startswith("ema.") for k in a["state_dict"])
    for k, v in a["state_dict"].items():
        assert torch.equal(b["state_dict"][k], v), k
    (oa,), (ob,) = a["optimizer_states"], b["optimizer_states"]
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for i, st in oa["state"].items():
        for name, v in st.items():
            assert torch.equal(ob["state"][i][name], v), (i, name)
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert a.get("diffctl") == b.get("diffctl")


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_resume_is_bitwise_exact_mid_epoch_at_epoch_end_and_after_max_steps(tmp_path, record_steps, precision):
    overrides = [*tiny_overrides("unet"), *EXACT, f"trainer.precision={precision}"]
    run_train(tmp_path / "full", overrides)
    full = list(record_steps)
    assert [s for s, *_ in full] == list(range(20))
    reference = load_ckpt(tmp_path / "full" / "checkpoints" / "last.ckpt")

    # Stopped at step 4 (mid-epoch) or 8 (exactly at an epoch end), resumed to 20.
    for k in ((4, 8) if precision == "32-true" else (4,)):
        record_steps.clear()
        result = run_train(tmp_path / f"from{k}", [*overrides, f"resume={tmp_path / 'full' / 'checkpoints' / f'step_{k:07d}.ckpt'}"])
        assert result["global_step"] == 20
        assert record_steps == full[k:], f"resumed at {k}: different data, noise or RNG state"
        assert_same_training_state(reference, load_ckpt(tmp_path / f"from{k}" / "checkpoints" / "last.ckpt"))

    # A run that ended at max_steps=10 (between saves, mid-epoch), continued to 20 from its run directory.
    record_steps.clear()
    run_train(tmp_path / "short", [*overrides, "trainer.max_steps=10"])
    assert (tmp_path / "short" / "checkpoints" / "step_0000010.ckpt").is_file()
    record_steps.clear()
    run_train(tmp_path / "continued", [*overrides, f"resume={tmp_path / 'short'}"])
    assert record_steps == full[10:]
    assert_same_training_state(reference, load_ckpt(tmp_path / "continued" / "checkpoints" / "last.ckpt"))


def test_every_epoch_walks_a_new_permutation_of_the_data(tmp_path, record_steps):
    run_train(tmp_path, [*tiny_overrides("unet"), "trainer.max_steps=24"])  # 3 epochs of 8 batches
    epochs = [[d for _, _, d, _ in record_steps[e * 8 : (e + 1) * 8]] for e in range(3)]
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]
    # (each epoch is a permutation: the same batches-worth of images, in another order and grouping)
    assert [b for _, b, _, _ in record_steps] == list(range(8)) * 3


def test_gradient_accumulation_with_an_epoch_that_does_not_divide_resumes_exactly(tmp_path, record_steps):
    # 8 batches per epoch, 3 per step: Lightning steps after batches 3, 6, 8 (short step), 11, ...
    overrides = [*tiny_overrides("unet"), "trainer.accumulate_grad_batches=3", "trainer.max_steps=7", "checkpoint.every_n_steps=2"]
    run_train(tmp_path / "full", overrides)
    full = list(record_steps)
    record_steps.clear()
    run_train(tmp_path / "resumed", [*overrides, f"resume={tmp_path / 'full' / 'checkpoints' / 'step_0000004.ckpt'}"])
    assert record_steps == full[len(full) - len(record_steps) :] and len(record_steps) == len(full) - 11
    assert_same_training_state(
        load_ckpt(tmp_path / "full" / "checkpoints" / "last.ckpt"), load_ckpt(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    )


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
