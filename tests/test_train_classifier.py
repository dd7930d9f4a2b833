"""`diffctl train-classifier`: the noise-conditional classifier for classifier guidance, its training,
exact resume, reports and the loader sampling uses (`load_classifier(path).log_probs(x, t)`)."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import TINY_RUN, compose_train, load_ckpt, run_cli, run_train, subtree, tiny_overrides
from PIL import Image

from diffctl.errors import CheckpointError, ConfigError

# train's tiny run (helpers.TINY_RUN: 128 digits, batch 16, 3 CPU steps, no logger or bar) with a tiny
# classifier; train's sample grid is not a key of train-classifier.
TINY = [*(o for o in TINY_RUN if not o.startswith("sample_grid.")), "model.base_channels=8", "report.bins=3", "report.limit=64"]


def run_classifier(run_dir, overrides):
    from diffctl.train_classifier import train_classifier

    run_dir.mkdir(parents=True, exist_ok=True)
    return train_classifier(compose_train(run_dir, [*TINY, *overrides], config_name="train_classifier"))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("clf") / "run"
    return run, run_classifier(run, ["model.pool=attention", "model.attn_resolutions=[4]"])


# --- outputs -------------------------------------------------------------------------------


def test_trains_and_writes_checkpoint_report_and_plot(tiny_run):
    run, result = tiny_run
    assert result["global_step"] == 3 and math.isfinite(result["loss"])
    config = load_ckpt(run / "checkpoints" / "last.ckpt")["hyper_parameters"]["config"]
    assert config["kind"] == "classifier" and config["data_shape"] == {"channels": 1, "resolution": 8, "num_classes": 10}
    report = json.loads((run / "accuracy.json").read_text())
    assert report["bin_by"] == "t" and report["num_classes"] == 10 and report["held_out"]
    # three bins tiling [eps, 1], each evaluated on the 64 test images asked for
    edges = [1e-5 + (1 - 1e-5) * k / 3 for k in range(4)]
    assert [v for row in report["bins"] for v in row["t"]] == pytest.approx([v for pair in zip(edges, edges[1:]) for v in pair])
    assert all(row["images"] == 64 and 0 <= row["accuracy"] <= 1 for row in [*report["bins"], report["clean"]])
    assert report["clean"]["t"] == 1e-5 and result["clean_accuracy"] == report["clean"]["accuracy"]
    with Image.open(run / "accuracy.png") as png:
        assert png.format == "PNG" and png.size[0] > 300


def test_log_snr_bins_are_equal_in_log_snr(tmp_path):
    """report.bin_by=logsnr: edges equally spaced from log SNR(eps) down to log SNR(1) (VP closed form)."""
    from diffctl.classifier import load_classifier
    from diffctl.classifier_report import accuracy_report
    from diffctl.data import build_dataset

    run = tmp_path / "run"
    run_classifier(run, ["trainer.max_steps=1"])
    classifier = load_classifier(run)
    report = accuracy_report(classifier, build_dataset("digits", split="test"),
                             {"bins": 4, "bin_by": "logsnr", "batch_size": 50, "limit": 20, "seed": 0})  # fmt: skip

    def vp_log_snr(t):  # alpha^2 / sigma^2 = 1 / expm1(int beta)
        return -math.log(math.expm1(0.1 * t + 0.5 * 19.9 * t * t))

    hi, lo = vp_log_snr(1e-5), vp_log_snr(1.0)
    edges = [hi + (lo - hi) * k / 4 for k in range(5)]
    assert [v for row in report["bins"] for v in row["logsnr"]] == pytest.approx([v for pair in zip(edges, edges[1:]) for v in pair])
    for row in report["bins"]:  # each bin's t range maps back onto its log SNR range
        assert [vp_log_snr(t) for t in row["t"]] == pytest.approx(row["logsnr"], rel=1e-6)
    # each image's noise level and noise are its own (counter-based): the batch size changes nothing
    again = accuracy_report(classifier, build_dataset("digits", split="test"),
                            {"bins": 4, "bin_by": "logsnr", "batch_size": 7, "limit": 20, "seed": 0})  # fmt: skip
    assert [r["accuracy"] for r in again["bins"]] == [r["accuracy"] for r in report["bins"]]
    assert [r["nll"] for r in again["bins"]] == pytest.approx([r["nll"] for r in report["bins"]], rel=1e-6)


# --- the network's inputs and the loss --------------------------------------------------------


def _recording_classifier(sde, scale_input=True):
    from diffctl.classifier import NoisyClassifier
    from diffctl.networks.classifier import EncoderClassifier

    torch.manual_seed(0)
    net = EncoderClassifier(1, 8, 10, base_channels=8)
    seen = {}
    net.register_forward_hook(lambda m, args, out: seen.update(x=args[0], labels=args[1], logits=out))
    return NoisyClassifier(net, sde, sigma_data=0.5, scale_input=scale_input), seen


@pytest.mark.parametrize("scale_input", [True, False])
def test_network_reads_x_t_as_the_denoiser_does(scale_input):
    """Input x / sqrt(alpha^2 sigma_data^2 + sigma^2) and noise label 1000 t, with VP's closed-form alpha, sigma."""
    from diffctl.sde import VPSDE

    classifier, seen = _recording_classifier(VPSDE(), scale_input)
    x, t = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.tensor([1e-3, 0.2, 0.5, 1.0], dtype=torch.float64)
    classifier.double()(x, t)
    integral = 0.1 * t + 0.5 * 19.9 * t**2
    alpha, sigma = torch.exp(-integral / 2), torch.sqrt(1 - torch.exp(-integral))
    scale = 1 / torch.sqrt(alpha**2 * 0.25 + sigma**2) if scale_input else torch.ones(4, dtype=torch.float64)
    assert torch.allclose(seen["x"], x * scale[:, None, None, None], rtol=1e-12)
    assert torch.allclose(seen["labels"], 1000 * t, rtol=1e-12)


def test_loss_is_the_cross_entropy_at_stratified_noise_levels():
    from diffctl.classifier import ClassifierObjective
    from diffctl.rng import BatchRandom
    from diffctl.sde import VESDE

    sde = VESDE(sigma_min=0.02, sigma_max=10.0)
    classifier, seen = _recording_classifier(sde)
    x0, y = torch.rand(16, 1, 8, 8) * 2 - 1, torch.arange(16) % 10
    loss = ClassifierObjective(sde).loss(classifier, x0, {"class_label": y}, BatchRandom(3, 7, 0, 0, 1, 16, "cpu"))
    t = seen["labels"].double() / 1000
    # one time in each of the 16 equal strata of [eps, 1]
    assert sorted(((t - 1e-5) / (1 - 1e-5) * 16).floor().long().tolist()) == list(range(16))
    # the input is x0 + sigma(t) eps (VE) over its marginal std, for standard normal eps
    sigma = 0.02 * (10.0 / 0.02) ** t
    eps = (seen["x"].double() * torch.sqrt(0.25 + sigma**2)[:, None, None, None] - x0.double()) / sigma[:, None, None, None]
    assert abs(float(eps.mean())) < 0.1 and abs(float(eps.std()) - 1) < 0.1
    logits = seen["logits"].detach().double().numpy()
    log_softmax = logits - logits.max(1, keepdims=True) - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
    assert float(loss.detach()) == pytest.approx(-log_softmax[np.arange(16), y.numpy()].mean(), rel=1e-5)


def test_attention_pool_is_a_set_function_of_positions_with_zero_positional_embedding():
    """Attention pooling (mean token as the query over every position) with no positional embedding
    cannot tell where a feature is: permuting the positions leaves its output unchanged."""
    from diffctl.networks.classifier import AttentionPool2d

    torch.manual_seed(0)
    pool = AttentionPool2d(4, 8, 2, 5)
    with torch.no_grad():
        pool.positional.zero_()
    x = torch.randn(3, 8, 4, 4)
    shuffled = x.flatten(2)[:, :, torch.randperm(16)].reshape(3, 8, 4, 4)
    assert torch.allclose(pool(x), pool(shuffled), atol=1e-6)
    with torch.no_grad():
        pool.positional.normal_()  # with one, positions matter
    assert not torch.allclose(pool(x), pool(shuffled), atol=1e-3)


# --- resume ----------------------------------------------------------------------------------

EXACT = ["trainer.max_steps=12", "checkpoint.every_n_steps=4", "model.dropout=0.2", "ema.decay=0.8", "ema.warmup=false",
         "optim.warmup_steps=3", "trainer.deterministic=true"]  # fmt: skip


def _same_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys() and any(k.startswith("ema.") for k in a["state_dict"])
    assert all(torch.equal(v, b["state_dict"][k]) for k, v in a["state_dict"].items())
    (oa,), (ob,) = a["optimizer_states"], b["optimizer_states"]
    assert oa["param_groups"] == ob["param_groups"] and a["lr_schedulers"] == b["lr_schedulers"]
    assert all(torch.equal(v, ob["state"][i][n]) for i, st in oa["state"].items() for n, v in st.items())


def test_resume_mid_epoch_and_at_epoch_end_is_bitwise_exact(tmp_path):
    """128 images / batch 16: 8 batches an epoch; stopped at step 4 (mid-epoch) or 8 (epoch end), resumed to 12."""
    run_classifier(tmp_path / "full", EXACT)
    reference = load_ckpt(tmp_path / "full" / "checkpoints" / "last.ckpt")
    for k in (4, 8):
        result = run_classifier(tmp_path / f"from{k}", [*EXACT, f"resume={tmp_path / 'full' / 'checkpoints' / f'step_{k:07d}.ckpt'}"])
        assert result["global_step"] == 12
        _same_state(reference, load_ckpt(tmp_path / f"from{k}" / "checkpoints" / "last.ckpt"))
        assert (tmp_path / f"from{k}" / "accuracy.json").read_text() == (tmp_path / "full" / "accuracy.json").read_text()


def test_resume_takes_the_classifier_from_the_checkpoint(tmp_path, tiny_run):
    run, _ = tiny_run
    result = run_classifier(tmp_path / "more", ["trainer.max_steps=4", "model.pool=adaptive", f"resume={run}"])
    assert result["global_step"] == 4
    config = load_ckpt(tmp_path / "more" / "checkpoints" / "last.ckpt")["hyper_parameters"]["config"]
    assert config["model"]["pool"] == "attention"


# --- learning ---------------------------------------------------------------------------------


def test_accuracy_learns_far_above_chance_and_falls_with_noise(tmp_path):
    """A short run on digits under a gentle VP SDE (beta_max = 2: alpha(1) = 0.59, sigma(1) = 0.81, so a
    short run learns; under beta_max = 20 most of [eps, 1] is almost pure noise and learning takes longer)."""
    result = run_classifier(tmp_path / "run", [
        "sde.beta_max=2", "data.limit=null", "data.batch_size=64", "trainer.max_steps=60", "optim.lr=1e-2",
        "optim.warmup_steps=5", "ema.decay=0.9", "report.limit=null", "report.bins=2",
    ])  # fmt: skip
    report = result["report"]
    assert report["clean"]["images"] == 297  # digits' whole held-out split
    assert report["clean"]["accuracy"] > 0.4, report  # chance: 0.1
    assert report["bins"][-1]["accuracy"] < report["clean"]["accuracy"] - 0.05, report


# --- the loader -------------------------------------------------------------------------------


def test_loader_gives_normalised_log_probs_differentiable_in_x(tiny_run):
    from diffctl.classifier import load_classifier
    from diffctl.sde import VPSDE

    run, _ = tiny_run
    classifier = load_classifier(run)
    assert classifier.num_classes == 10 and classifier.data_shape == {"channels": 1, "resolution": 8, "num_classes": 10}
    assert isinstance(classifier.sde, VPSDE) and (classifier.sde.beta_min, classifier.sde.beta_max) == (0.1, 20.0)
    assert not any(p.requires_grad for p in classifier.parameters())
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.01, 0.5, 0.9])
    logp = classifier.log_probs(x, t)
    assert logp.shape == (3, 10) and torch.allclose(logp.exp().sum(-1), torch.ones(3))
    # its EMA weights, not the raw ones: the same as a network loaded with the checkpoint's ema.* tensors
    state = load_ckpt(run / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(torch.equal(v, state["ema." + k]) for k, v in classifier.state_dict().items())
    assert not all(torch.equal(v, state["denoiser." + k]) for k, v in classifier.state_dict().items())
    # the gradient in x agrees with finite differences (float64)
    classifier.double()
    xd = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    t2 = torch.tensor([0.1, 0.6], dtype=torch.float64)
    # fast mode: the Jacobian against finite differences along random directions (the full one: 64x slower)
    assert torch.autograd.gradcheck(lambda v: classifier.log_probs(v, t2), (xd,), fast_mode=True)
    with pytest.raises(ValueError, match=r"this classifier takes \[B, 1, 8, 8\]"):
        classifier.log_probs(torch.randn(2, 3, 8, 8, dtype=torch.float64), 0.5)


def test_loader_and_resume_refuse_what_is_not_a_classifier(tmp_path, trained, tiny_run):
    from diffctl.classifier import load_classifier

    _, diffusion_run = trained
    with pytest.raises(CheckpointError, match=r"is a diffusion model checkpoint, not a classifier") as err:
        load_classifier(diffusion_run)
    assert "\n" not in str(err.value)
    (tmp_path / "noise.ckpt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        load_classifier(tmp_path / "noise.ckpt")
    with pytest.raises(CheckpointError, match=r"diffctl train-classifier` continues classifier runs only"):
        run_classifier(tmp_path / "a", [f"resume={diffusion_run}"])
    classifier_run, _ = tiny_run
    with pytest.raises(CheckpointError, match=r"holds a classifier checkpoint; `diffctl train` continues diffusion model runs only"):
        run_train(tmp_path / "b", [*tiny_overrides(), f"resume={classifier_run}"])
    from diffctl.build import load_denoiser

    with pytest.raises(CheckpointError, match=r"holds a classifier, not a diffusion model"):  # e.g. sample ckpt=<classifier>
        load_denoiser(classifier_run)


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(("overrides", "message"), [
    (["+report.binz=3"], r"^report.binz: no such config key of diffctl train-classifier; close matches: report.bins"),
    (["report.bin_by=snr"], r"^report.bin_by must be one of t, logsnr, got 'snr'$"),
    (["model.pool=max"], r"^model.pool must be one of adaptive, attention, got 'max'$"),
    (["report.bins=0"], r"^report.bins must be a positive integer, got 0$"),
    (["+model.out_channels=3"], r"^model.out_channels: no such config key of diffctl train-classifier"),
    (["trainer=fsdp_cpu"], r"^train-classifier trains with one process or DDP, not trainer.strategy=fsdp"),
    (["+model=unet"], r"^model._target_=diffctl.networks.UNet is a diffusion model, not a classifier"),
])  # fmt: skip
def test_bad_config_is_one_line_error_before_any_work(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        run_classifier(tmp_path / "run", overrides)
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "run").rglob("*.ckpt"))


def test_unlabelled_dataset_is_refused(tmp_path):
    images = tmp_path / "flat"
    images.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(images / f"{i}.png")
    with pytest.raises(ConfigError, match=r"^train-classifier needs class labels, but data=imagefolder has none \(a flat folder"):
        run_classifier(tmp_path / "run", ["data=imagefolder", f"data.root={images}", "data.resolution=8", "data.limit=null",
                                          "data.batch_size=2"])  # fmt: skip


# --- the real command, once --------------------------------------------------------------------


def test_cli_trains_reports_and_prints_a_table(tmp_path):
    run = tmp_path / "run"
    proc = run_cli(["train-classifier", *TINY, "report.bins=2", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "diffctl train-classifier: done" in proc.stdout and "classifier accuracy against noise level" in proc.stdout
    assert all((run / name).is_file() for name in ("accuracy.json", "accuracy.png", "checkpoints/last.ckpt", "train_classifier.log"))


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    """2 gloo processes x batch 8 follow one process x batch 16 (train's DDP: diffctl.train.build_trainer)."""
    common = ["train-classifier", *TINY, "trainer.max_steps=4", "optim.warmup_steps=0", "report.bins=1", "report.limit=16"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    a = run_cli([*common, "data.batch_size=16", f"hydra.run.dir={single}"], tmp_path)
    assert a.returncode == 0, a.stderr[-3000:]
    b = run_cli([*common, "trainer=ddp_cpu", "trainer.devices=2", "data.batch_size=8", f"hydra.run.dir={ddp}"], tmp_path)
    assert b.returncode == 0, b.stderr[-3000:]
    state = load_ckpt(single / "checkpoints" / "last.ckpt")["state_dict"]
    wa, wb = subtree(state, "denoiser."), subtree(load_ckpt(ddp / "checkpoints" / "last.ckpt")["state_dict"], "denoiser.")
    assert max(float((wa[k] - state["ema." + k]).abs().max()) for k in wa) > 0  # the weights moved (the EMA lags)
    for k in wa:  # gradients averaged over ranks in another summation order: equal up to rounding
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    # only rank 0 writes: one run directory, one report
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["last.ckpt", "step_0000004.ckpt"]
    assert json.loads((ddp / "accuracy.json").read_text())["bins"][0]["images"] == 16
    assert b.stdout.count("classifier accuracy against noise level") == 1
