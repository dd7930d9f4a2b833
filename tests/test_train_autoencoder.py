"""`diffctl train-autoencoder` (issue 18): training end to end into the export that `diffctl train
first_stage=` reads, the ELBO's decoder likelihood and KL against torch.distributions, exact resume
with the discriminator on, and the refusals."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from helpers import compose_train, load_ckpt, run_cli, run_train, subtree, tiny_overrides
from test_train import assert_same_training_state

from diffctl.autoencoder_report import decoder_nll
from diffctl.conditioning import IMAGE
from diffctl.errors import ConfigError
from diffctl.first_stage import load_first_stage
from diffctl.networks.posterior import DiagonalGaussian

TINY = ["model.block_out_channels=[8,8]", "model.norm_num_groups=4", "model.latent_channels=2", "logger=none",
        "progress_bar=false", "report.rfid=false", "report.num_images=64", "report.prior_samples=4",
        "trainer.accelerator=cpu", "data.limit=128", "data.batch_size=16"]  # fmt: skip


def run_autoencoder(run_dir, overrides):
    from diffctl.train_autoencoder import train_autoencoder

    run_dir.mkdir(parents=True, exist_ok=True)
    return train_autoencoder(compose_train(run_dir, [*TINY, *overrides], config_name="train_autoencoder"))


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ae")
    return root, run_autoencoder(root / "run", ["trainer.max_steps=6"])


def test_the_run_exports_its_ema_weights_and_reports(ae_run):
    root, result = ae_run
    run = root / "run"
    assert result["global_step"] == 6
    exported = load_first_stage(run)  # the run directory: its autoencoder/ export
    from_ckpt = load_first_stage(run / "checkpoints" / "last.ckpt")  # the checkpoint's EMA weights
    ema = subtree(load_ckpt(run / "checkpoints" / "last.ckpt")["state_dict"], "ema.autoencoder.")
    for k, v in exported.state_dict().items():
        assert torch.equal(v, ema[k]) and torch.equal(from_ckpt.state_dict()[k], v), k
    assert not any(".lpips." in k for k in load_ckpt(run / "checkpoints" / "last.ckpt")["state_dict"])
    report = json.loads((run / "autoencoder_report.json").read_text())
    assert report["num_images"] == 64 and report["latent_shape"] == [2, 4, 4]
    assert report["kl_bits_per_dim"] > 0 and 0 < report["ssim"] <= 1
    assert math.isclose(exported.scaling_factor, report["scale_factor"])  # LDM's 1/std, stored in the export
    for name in ("reconstructions.png", "prior_samples.png"):
        assert (run / name).stat().st_size > 0


@pytest.fixture(scope="module")
def latent_run(ae_run):
    root, _ = ae_run
    overrides = [*tiny_overrides("unet"), "model.channel_mult=[1,2]", "model.attn_resolutions=[]",
                 f"first_stage={root / 'run'}", f"latent.cache_dir={root / 'cache'}", "trainer.max_steps=2"]  # fmt: skip
    return root, run_train(root / "latent", overrides)


def test_train_diffuses_in_the_trained_autoencoders_latents(latent_run):
    root, result = latent_run
    assert result["global_step"] == 2
    (cache,) = (root / "cache").iterdir()
    assert json.loads((cache / "meta.json").read_text())["latent_shape"] == [2, 4, 4]


def test_decoder_likelihood_and_kl_against_torch_distributions():
    torch.manual_seed(0)
    x, recon = torch.rand(3, 1, 4, 4) * 2 - 1, torch.rand(3, 1, 4, 4) * 2 - 1
    for logvar in (-2.0, 0.3):
        laplace = torch.distributions.Laplace(recon.double(), math.exp(logvar))
        normal = torch.distributions.Normal(recon.double(), math.exp(0.5 * logvar))
        torch.testing.assert_close(decoder_nll(x, recon, logvar, "l1"), -laplace.log_prob(x.double()).flatten(1).sum(1))
        torch.testing.assert_close(decoder_nll(x, recon, logvar, "l2"), -normal.log_prob(x.double()).flatten(1).sum(1))
    q = DiagonalGaussian(torch.randn(3, 4, 2, 2))
    prior = torch.distributions.Normal(torch.zeros(3, 2, 2, 2), torch.ones(3, 2, 2, 2))
    want = torch.distributions.kl_divergence(torch.distributions.Normal(q.mean, q.std), prior).flatten(1).sum(1)
    torch.testing.assert_close(q.kl(), want)


class IdentityGaussianAutoencoder(torch.nn.Module):
    """q(z | x) = N(x, exp(lv) I) over z of the image's shape, decoder mean z: the ELBO's expectation has a
    closed form, and the decoder is exact, so the dequantization noise is not lost under a fitting error."""

    def __init__(self, lv: float):
        super().__init__()
        self.lv = lv

    def latent_shape(self, channels, height, width):
        return (channels, height, width)

    def encode(self, x):
        return DiagonalGaussian(torch.cat([x, torch.full_like(x, self.lv)], 1))

    def decode(self, z):
        return z


@pytest.mark.parametrize("reconstruction", ["l2", "l1"])
def test_the_reports_elbo_equals_the_closed_form_of_a_gaussian_autoencoder(reconstruction):
    """The report's one-draw ELBO (posterior noise and dequantization keyed per image) over 2000 images of
    12x12 against its expectation, derived by hand. Data x = k/127.5 - 1, dequantized x~ = (k + u)/128 - 1,
    whose mean is m = (k + 1/2)/128 - 1; z = x + s e. For l2: E(x~ - z)^2 = (m - x)^2 + 1/(12 * 128^2) + s^2
    per pixel. For l1 the posterior is made nearly exact (logvar -30), and with r = m - x, |r| <= h = 1/256:
    E|r + u'| over u' ~ U[-h, h] is (r^2 + h^2) / (2h). KL = sum (x^2 + s^2 - 1 - log s^2) / 2.
    The estimate's standard deviation, measured over 30 sets of independent torch draws, is 0.0006 (l2) and
    0.0024 (l1) bits/dim; the tolerance is 5 of them. Decoding the posterior mean instead of a draw moves
    l2 by -0.27, and leaving out the dequantization moves l2 by -0.008 and l1 by -1.5 bits/dim."""
    from diffctl.autoencoder_report import autoencoder_report

    g = torch.Generator().manual_seed(0)
    n, side = 2000, 12  # SSIM needs images of 11x11 or more
    k = torch.randint(0, 256, (n, 1, side, side), generator=g).double()
    x = (k / 127.5 - 1).float()
    lv, logvar = (-8.0, -7.0) if reconstruction == "l2" else (-30.0, -6.0)  # posterior and decoder log-variances
    report = {"num_images": n, "batch_size": 500, "seed": 0, "split": "test", "prior_samples": 0, "rfid": False}
    out = autoencoder_report(IdentityGaussianAutoencoder(lv), [{IMAGE: xi} for xi in x], report, "cpu", logvar,
                             reconstruction, progress=False)  # fmt: skip

    dim, r, var = side * side, ((k + 0.5) / 128 - 1 - x.double()).flatten(1), math.exp(lv)
    if reconstruction == "l2":
        sq = r.square() + 1 / (12 * 128**2) + var
        nll = (0.5 * (sq / math.exp(logvar) + logvar + math.log(2 * math.pi))).sum(1)
    else:
        h = 1 / 256
        assert float(r.abs().max()) <= h
        mean_abs = (r.square() + h**2) / (2 * h)
        nll = (mean_abs / math.exp(logvar) + math.log(2 * math.exp(logvar))).sum(1)
    kl = (0.5 * (x.double().square() + var - 1 - math.log(var))).flatten(1).sum(1)
    bits = lambda nats: float(nats.mean()) / (dim * math.log(2)) + 7  # noqa: E731  (bins of 1/128 in [-1, 1])
    assert out["kl_bits_per_dim"] == pytest.approx(bits(kl) - 7, rel=1e-6)  # no noise in the KL (float32 moments)
    tolerance = {"l2": 0.003, "l1": 0.012}[reconstruction]
    assert out["reconstruction_bits_per_dim"] == pytest.approx(bits(nll), abs=tolerance)
    assert out["elbo_bits_per_dim"] == pytest.approx(bits(nll + kl), abs=tolerance)
    # the decoder's scale at its maximum likelihood: b = E|x~ - z| (l1) or var = E(x~ - z)^2 (l2) per pixel
    fitted = 0.5 * (1 + math.log(2 * math.pi * float(sq.mean()))) if reconstruction == "l2" else 1 + math.log(2 * float(mean_abs.mean()))
    assert out["elbo_bits_per_dim_fitted_scale"] == pytest.approx(fitted / math.log(2) + bits(kl), abs=tolerance)


DISC = ["loss.discriminator.enabled=true", "loss.discriminator.start=0", "loss.discriminator.n_layers=1",
        "loss.discriminator.channels=8", "checkpoint.every_n_steps=2"]  # fmt: skip


def test_resume_with_the_discriminator_is_exact(tmp_path):
    full = run_autoencoder(tmp_path / "full", [*DISC, "trainer.max_steps=4"])
    assert full["global_step"] == 4  # one optimizer step a batch, generator and discriminator together
    run_autoencoder(tmp_path / "first", [*DISC, "trainer.max_steps=2"])
    run_autoencoder(tmp_path / "second", [*DISC, "trainer.max_steps=4", f"resume={tmp_path / 'first'}"])
    a, b = (load_ckpt(tmp_path / d / "checkpoints" / "last.ckpt") for d in ("full", "second"))
    assert any(k.startswith("denoiser.loss.discriminator.") for k in a["state_dict"])
    assert_same_training_state(a, b)


def test_refusals(tmp_path, latent_run):
    root, _ = latent_run
    with pytest.raises(ConfigError, match="not an autoencoder"):
        run_autoencoder(tmp_path / "a", ["model._target_=diffctl.networks.unet.UNet"])
    with pytest.raises(ConfigError, match="multiples of 4"):
        run_autoencoder(tmp_path / "b", ["model.block_out_channels=[8,8,8]", "data.resolution=6"])
    with pytest.raises(ConfigError, match="n_layers=3 needs images of at least 32x32"):
        run_autoencoder(tmp_path / "c", ["loss.discriminator.enabled=true"])
    diffusion = root / "latent" / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match="holds a diffusion model checkpoint, not an autoencoder"):
        load_first_stage(diffusion)


def test_ddp_two_processes_match_one_process(tmp_path):
    """2 gloo processes x batch 8 follow 1 process x batch 16: the posterior noise and the flips are drawn
    per sample of the global batch, and DDP averages the gradients. The discriminator is off here: its
    adaptive weight is a gradient-norm ratio of each process's own batch (as in LDM), not of the global one."""
    common = [*TINY, "trainer.max_steps=3", "data.random_flip=true", "optim.lr=1e-3"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    a = run_cli(["train-autoencoder", *common, "data.batch_size=16", f"hydra.run.dir={single}"], tmp_path)
    assert a.returncode == 0, a.stderr[-3000:]
    b = run_cli(["train-autoencoder", *common, "trainer=ddp_cpu", "trainer.devices=2", "data.batch_size=8",
                 f"hydra.run.dir={ddp}"], tmp_path)  # fmt: skip
    assert b.returncode == 0, b.stderr[-3000:]
    sa, sb = (load_ckpt(d / "checkpoints" / "last.ckpt")["state_dict"] for d in (single, ddp))
    wa, wb = subtree(sa, "denoiser."), subtree(sb, "denoiser.")
    assert max(float((wa[k] - subtree(sa, "ema.")[k]).abs().max()) for k in subtree(sa, "ema.")) > 0  # it trained
    # The attention key bias has an exactly zero gradient (softmax ignores a shift shared by all keys), so
    # Adam turns its rounding noise into lr-sized steps of either sign: it is left out.
    for k in (k for k in wa if not k.endswith("to_k.bias")):  # gradients summed in another order: float rounding
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6)
    assert (ddp / "autoencoder" / "config.json").exists()  # one report and one export, by the first process


def test_ddp_with_the_discriminator_starting_late(tmp_path):
    """Before its start step the discriminator gets no gradients, which plain DDP refuses; the command
    switches to ddp_find_unused_parameters_true, so the run gets past the start. SyncBatchNorm is CUDA-only:
    on CPU processes the command says it leaves it off instead of failing in DDP's setup."""
    disc = [d if not d.startswith("loss.discriminator.start") else "loss.discriminator.start=2" for d in DISC]
    out = tmp_path / "ddp"
    r = run_cli(["train-autoencoder", *TINY, *disc, "trainer.max_steps=4", "trainer=ddp_cpu", "trainer.devices=2",
                 "data.batch_size=8", f"hydra.run.dir={out}"], tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("SyncBatchNorm needs CUDA") == 1  # said once, by the first process
    assert re.search(r"│ autoencoder +│ AutoencoderTrainee", r.stdout) and "denoiser" not in r.stdout  # the parameter table
    state = load_ckpt(out / "checkpoints" / "last.ckpt")
    assert state["global_step"] == 4
    at_start = load_ckpt(out / "checkpoints" / "step_0000002.ckpt")["state_dict"]
    disc = [k for k in state["state_dict"] if k.startswith("denoiser.loss.discriminator.") and k.endswith("weight")]
    assert disc and all(not torch.equal(state["state_dict"][k], at_start[k]) for k in disc)  # it trained after its start
