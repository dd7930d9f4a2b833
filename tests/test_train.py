"""End-to-end training through the real config tree (in-process Hydra compose)."""

import csv
import math

import pytest
import torch
from helpers import compose_train, load_ckpt, run_train, subtree, tiny_overrides

MODELS = ["unet", "dit"]
SDES = ["vp", "vpsub", "ve", "linear"]
# (progressive needs a teacher: tests/test_progressive.py; regression a condition: tests/test_regression_objective.py)
OBJECTIVES = ["ddpm", "ncsn", "flow", "edm", "consistency"]


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
    assert stored["sde"]["_target_"].endswith({"vp": "VPSDE", "vpsub": "SubVPSDE", "ve": "VESDE", "linear": "LinearSDE"}[sde])


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
        seen.append((self.global_step, batch_idx, digest(batch["image"]), digest(torch.get_rng_state())))
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


CD = ["sde=ve", "objective=consistency", "objective.num_scales_start=18", "objective.num_scales_end=18",
      "objective.target_decay_start=0.95", "model.dropout=0.2", "channels_last=false"]


class StartState:
    """Lightning callback: the module's tensors when training starts (after a resumed run loaded its
    checkpoint), the student's and the teacher's outputs then, and the target's mode at every step."""

    def __new__(cls):
        import lightning as L

        class _StartState(L.Callback):
            def __init__(self):
                self.state, self.outputs, self.target_training = None, None, []

            def on_train_start(self, trainer, module):
                self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}
                x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
                t = torch.tensor([0.3, 0.9])
                module.denoiser.eval()  # without dropout, as the teacher runs
                with torch.no_grad():
                    self.outputs = {name: (net.raw(x, t), net(x, t).x0) for name, net in
                                    (("student", module.denoiser), ("teacher", module.teacher))}
                module.denoiser.train()

            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                self.target_training.append(module.target.training)

        return _StartState()


def _train_recording(run_dir, overrides):
    from diffctl.train import train

    run_dir.mkdir(parents=True, exist_ok=True)
    start = StartState()
    train(compose_train(run_dir, overrides), callbacks=[start])
    return start


def test_distillation_starts_from_the_teacher_and_a_resumed_run_from_its_checkpoint(tmp_path):
    from diffctl.errors import ConfigError

    teacher = tmp_path / "teacher"
    run_train(teacher, [*tiny_overrides("unet"), "sde=ve", "trainer.max_steps=2", "model.dropout=0.2"])
    teacher_net = subtree(load_ckpt(teacher / "checkpoints" / "last.ckpt")["state_dict"], "ema.net.")  # the teacher is its EMA
    student = [*tiny_overrides("unet"), *CD, f"objective.teacher={teacher}", "trainer.max_steps=2",
               "checkpoint.every_n_steps=1", "trainer.deterministic=true"]
    full = _train_recording(tmp_path / "full", student)
    # Step 0: the student, its EMA and its target hold the teacher's network weights exactly...
    for prefix in ("denoiser.net.", "ema.net.", "target.net.", "teacher.net."):
        got = subtree(full.state, prefix)
        assert got.keys() == teacher_net.keys() and all(torch.equal(got[k], v) for k, v in teacher_net.items()), prefix
    # ...so the network output F is the teacher's, while the x0 each computes from it differs: the
    # student's is the consistency parameterization c_skip y + c_out F, the teacher's (x - sigma F)/alpha.
    (raw_s, x0_s), (raw_t, x0_t) = full.outputs["student"], full.outputs["teacher"]
    torch.testing.assert_close(raw_s, raw_t, rtol=0, atol=0)
    assert (x0_s - x0_t).abs().max() > 1e-2
    assert full.target_training == [True, True]  # the target runs with dropout, on the online masks

    # Resumed from step 1: weights come from the checkpoint, not the teacher, and it ends as the full run.
    step1 = load_ckpt(tmp_path / "full" / "checkpoints" / "step_0000001.ckpt")
    resumed = _train_recording(tmp_path / "resumed", [*student, f"resume={tmp_path / 'full' / 'checkpoints' / 'step_0000001.ckpt'}"])
    assert all(torch.equal(resumed.state[k], v) for k, v in step1["state_dict"].items())
    assert not all(torch.equal(resumed.state["denoiser.net." + k], v) for k, v in teacher_net.items())
    assert_same_training_state(load_ckpt(tmp_path / "full" / "checkpoints" / "last.ckpt"),
                               load_ckpt(tmp_path / "resumed" / "checkpoints" / "last.ckpt"))

    # Switched off: a random start (the same for student, EMA and target).
    scratch = _train_recording(tmp_path / "scratch", [*student, "objective.init_from_teacher=false", "trainer.max_steps=1"])
    net = subtree(scratch.state, "denoiser.net.")
    assert not all(torch.equal(net[k], v) for k, v in teacher_net.items())
    assert all(torch.equal(subtree(scratch.state, "target.net.")[k], v) for k, v in net.items())
    # Another architecture cannot start from the teacher: one line naming the switch.
    with pytest.raises(ConfigError, match=r"objective.init_from_teacher=true needs the teacher's architecture.*init_from_teacher=false"):
        run_train(tmp_path / "wide", [*student, "model.base_channels=32"])


def test_consistency_target_draws_the_online_dropout_masks_in_training(tmp_path):
    """In a real training step, with channels_last (the CPU default) and dropout on."""
    import lightning as L

    masks = {"denoiser": [], "target": []}

    class RecordMasks(L.Callback):
        def on_train_start(self, trainer, module):
            for name in masks:
                for m in getattr(module, name).modules():
                    if isinstance(m, torch.nn.Dropout):
                        m.register_forward_hook(lambda mod, args, out, name=name: masks[name].append(out == 0))

    from diffctl.train import train

    overrides = [*tiny_overrides("unet"), "objective=consistency", "model.dropout=0.5", "channels_last=true", "trainer.max_steps=2"]
    train(compose_train(tmp_path, overrides), callbacks=[RecordMasks()])
    assert len(masks["denoiser"]) == len(masks["target"]) > 2
    assert all(torch.equal(a, b) for a, b in zip(masks["denoiser"], masks["target"]))


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
