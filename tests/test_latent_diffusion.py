"""Latent diffusion (`diffctl train first_stage=...`, issue 18): the training set encoded once into the
cache, the latent scale estimated from it, training on posterior draws, the first stage stored in the
checkpoint once, sampling that decodes, exact resume from the checkpoint alone, and the refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import compose_train, load_ckpt, run_cli, run_sample, run_train, subtree, tiny_overrides
from test_train import assert_same_training_state

from diffctl.conditioning import IMAGE
from diffctl.errors import ConfigError, DataError
from diffctl.first_stage import load_first_stage, save_autoencoder
from diffctl.networks.autoencoder import AutoencoderKL

# f = 2 on digits' 8x8: latents [2, 4, 4]; a U-Net with one level fewer than the pixel one
TINY_LATENT_UNET = ["model.base_channels=16", "model.channel_mult=[1,2]", "model.num_res_blocks=1", "model.attn_resolutions=[]"]


def _autoencoder(in_channels: int = 1, seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=in_channels, out_channels=in_channels, block_out_channels=[8, 8], layers_per_block=1,
                         latent_channels=2, norm_num_groups=4)  # fmt: skip


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae") / "vae"
    save_autoencoder(_autoencoder(), folder)
    return folder


def _overrides(vae, cache, *more):
    return [*tiny_overrides("unet"), *TINY_LATENT_UNET, f"first_stage={vae}", f"latent.cache_dir={cache}", *more]


@pytest.fixture(scope="module")
def latent_run(vae, tmp_path_factory):
    """4 steps with flips, recording the x0 each training step diffused (the drawn, scaled latents)."""
    from diffctl.objectives import DDPMObjective

    root = tmp_path_factory.mktemp("latent")
    seen, original = [], DDPMObjective.loss

    def loss(self, model, x0, *args, **kwargs):
        seen.append(x0.detach().clone())
        return original(self, model, x0, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DDPMObjective, "loss", loss)
        result = run_train(root / "run", _overrides(vae, root / "cache", "data.random_flip=true", "trainer.max_steps=4"))
    return root, result, seen


def test_the_cache_holds_each_image_and_its_mirror_image_posterior(latent_run, vae):
    root, _, _ = latent_run
    (cache,) = (root / "cache").iterdir()
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["flips"] is True and meta["latent_shape"] == [2, 4, 4] and meta["num_images"] == 128
    stored = np.load(cache / "latents.npy")  # [N, 2 (image, mirror), 2 Cz (mean, std), h, w]
    assert stored.shape == (128, 2, 4, 4, 4)
    from diffctl.data import build_dataset

    x = torch.stack([build_dataset("digits", None, "train", 8, 1, limit=128)[i][IMAGE] for i in range(128)])
    ae = load_first_stage(vae)
    with torch.no_grad():
        for view, images in ((0, x), (1, x.flip(-1))):  # a mirrored image's latent is not the mirrored latent
            q = ae.encode(images)
            np.testing.assert_allclose(stored[:, view, :2], q.mean.numpy(), rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(stored[:, view, 2:], q.std.numpy(), rtol=1e-5, atol=1e-5)
    assert not np.allclose(stored[:, 1, :2], stored[:, 0, :2, :, ::-1], atol=1e-3)


def test_the_scale_makes_the_training_latents_unit_variance(latent_run):
    root, _, seen = latent_run
    ckpt = load_ckpt(root / "run" / "checkpoints" / "last.ckpt")
    config = ckpt["hyper_parameters"]["config"]
    (cache,) = (root / "cache").iterdir()
    stored = np.load(cache / "latents.npy").astype(np.float64)
    mean, std = stored[:, :, :2], stored[:, :, 2:]
    rng = np.random.default_rng(0)  # Monte Carlo over z ~ N(mean, std^2), independent of the exact formula
    z = mean[None] + std[None] * rng.standard_normal((40, *mean.shape))
    assert config["latent"]["scale"] == pytest.approx(1 / z.std(), rel=0.01)
    assert config["latent"]["shift"] == 0.0 and config["data_shape"] == {"channels": 2, "resolution": 4, "num_classes": 0}
    drawn = torch.cat(seen)  # what the objective diffused: (z - shift) * scale, [B, 2, 4, 4]
    assert drawn.shape[1:] == (2, 4, 4) and len(seen) == 4
    assert float(drawn.std()) == pytest.approx(1.0, abs=0.12)
    assert len({float(d.sum()) for d in seen}) == 4  # fresh posterior draws every step


def test_the_checkpoint_holds_the_first_stage_once_beside_the_denoiser(latent_run, vae):
    root, _, _ = latent_run
    state = load_ckpt(root / "run" / "checkpoints" / "last.ckpt")["state_dict"]
    first = subtree(state, "first_stage.autoencoder.")
    reference = load_first_stage(vae).state_dict()
    assert first.keys() == reference.keys() and all(torch.equal(first[k], reference[k]) for k in reference)
    assert not any("first_stage" in k for k in state if k.startswith(("denoiser.", "ema.")))  # never averaged or optimized
    assert (root / "run" / "samples" / "step_0000004.png").is_file()  # the grid decodes


def test_sampling_decodes_the_latents_with_the_stored_scale(latent_run, vae, tmp_path):
    root, _, _ = latent_run
    result = run_sample(tmp_path / "s", [f"ckpt={root / 'run'}", "num_samples=6", "batch_size=4", "sampler=ddim", "steps=3",
                                         "metrics.names=[]"])  # fmt: skip
    images = np.load(tmp_path / "s" / "samples.npz")["samples"]
    assert images.shape == (6, 8, 8, 1) and images.dtype == np.uint8 and result["nfe_per_sample"] == 3
    # the same samples by hand: DDIM on the EMA denoiser in latent space, then decode(u / scale + shift)
    from diffctl.images import to_uint8
    from diffctl.samplers import generate
    from diffctl.source import load_source

    source = load_source(compose_train(tmp_path / "unused", [f"ckpt={root / 'run'}"], "sample"), str(root / "run" / "checkpoints" / "last.ckpt"))
    latent = torch.cat([generate(source.denoiser, n, (2, 4, 4), "ddim", 3, 0, {}, "cpu", first) for first, n in ((0, 4), (4, 2))])
    config = load_ckpt(root / "run" / "checkpoints" / "last.ckpt")["hyper_parameters"]["config"]["latent"]
    with torch.no_grad():
        by_hand = to_uint8(load_first_stage(vae).decode(latent / config["scale"] + config["shift"]))
    assert np.array_equal(images, by_hand.numpy())


def test_resume_is_bitwise_from_the_checkpoint_alone(vae, tmp_path):
    first_stage = tmp_path / "vae"
    shutil.copytree(vae, first_stage)
    overrides = _overrides(first_stage, tmp_path / "cache", "data.limit=64", "trainer.max_steps=6", "checkpoint.every_n_steps=2",
                           "ema.warmup=false", "trainer.deterministic=true", "data.random_flip=true")  # fmt: skip
    run_train(tmp_path / "full", overrides)
    shutil.rmtree(first_stage)  # the folder has gone: the run goes on with the first stage in its checkpoint
    result = run_train(tmp_path / "resumed", [*overrides, f"resume={tmp_path / 'full' / 'checkpoints' / 'step_0000004.ckpt'}"])
    assert result["global_step"] == 6
    assert_same_training_state(load_ckpt(tmp_path / "full" / "checkpoints" / "last.ckpt"),
                               load_ckpt(tmp_path / "resumed" / "checkpoints" / "last.ckpt"))  # fmt: skip


def test_a_first_stage_that_does_not_fit_is_refused_before_encoding(tmp_path):
    rgb = tmp_path / "rgb"
    save_autoencoder(_autoencoder(in_channels=3), rgb)
    with pytest.raises(ConfigError, match=r"does not fit data=digits: 1-channel images for an autoencoder of in_channels=3"):
        run_train(tmp_path / "a", _overrides(rgb, tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()  # nothing encoded
    with pytest.raises(ConfigError, match=r"does not fit data=digits: 6x6 images: .* multiples of 4"):
        save_autoencoder(AutoencoderKL(in_channels=1, out_channels=1, block_out_channels=[8, 8, 8], layers_per_block=1,
                                       latent_channels=2, norm_num_groups=4), tmp_path / "f4")  # fmt: skip
        run_train(tmp_path / "b", _overrides(tmp_path / "f4", tmp_path / "cache", "data.resolution=6"))
    with pytest.raises(ConfigError, match=r"first_stage= with condition=sr is not supported"):
        run_train(tmp_path / "c", _overrides(rgb, tmp_path / "cache", "condition=sr"))
    with pytest.raises(ConfigError, match=r"first_stage=.*nothing: no such folder"):
        run_train(tmp_path / "d", _overrides(tmp_path / "nothing", tmp_path / "cache"))


def test_a_cache_made_from_other_inputs_is_refused_not_reencoded(latent_run, vae, tmp_path):
    root, _, _ = latent_run
    shutil.copytree(root / "cache", tmp_path / "cache")
    (cache,) = (tmp_path / "cache").iterdir()
    meta = json.loads((cache / "meta.json").read_text())
    (cache / "meta.json").write_text(json.dumps({**meta, "first_stage": "0" * 64}))
    before = (cache / "latents.npy").stat().st_mtime_ns
    with pytest.raises(DataError, match=r"was made with other first-stage weights .*delete it"):
        run_train(tmp_path / "r", _overrides(vae, tmp_path / "cache", "data.random_flip=true"))
    assert (cache / "latents.npy").stat().st_mtime_ns == before


def test_commands_without_a_latent_meaning_refuse_in_one_line(latent_run, tmp_path):
    root, _, _ = latent_run
    run = str(root / "run")
    for args, message in ((["likelihood", f"ckpt={run}", "num_batches=1"], "is a latent diffusion model: the ODE likelihood is of its latents"),
                          (["export", f"ckpt={run}", f"out={tmp_path / 'e'}"], "an export would leave out its first stage"),
                          (["inpaint", f"ckpt={run}", "limit=2"], "RePaint inpaints in pixel space")):  # fmt: skip
        out = run_cli([*args, f"hydra.run.dir={tmp_path / args[0]}"], tmp_path)
        assert out.returncode != 0
        errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], out.stderr[-2000:]
        assert "Traceback" not in out.stderr


def test_a_run_trains_the_same_whether_its_cache_was_built_or_reused(latent_run, vae, tmp_path):
    """Building the cache must not use up the global random stream the network is initialised from."""
    root, _, _ = latent_run  # its run built root/cache; this one reuses it
    run_train(tmp_path / "again", _overrides(vae, root / "cache", "data.random_flip=true", "trainer.max_steps=4"))
    assert_same_training_state(load_ckpt(root / "run" / "checkpoints" / "last.ckpt"),
                               load_ckpt(tmp_path / "again" / "checkpoints" / "last.ckpt"))  # fmt: skip


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_in_latent_space(vae, tmp_path):
    """2 gloo processes x batch 8 follow 1 process x batch 16: the posterior draws and flips are per sample
    of the global batch. The single run builds the cache, the DDP run reuses it."""
    common = [*_overrides(vae, tmp_path / "cache", "data.random_flip=true", "trainer.max_steps=3", "optim.warmup_steps=0",
                          "optim.lr=1e-3")]  # fmt: skip
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    a = run_cli(["train", *common, "data.batch_size=16", f"hydra.run.dir={single}"], tmp_path)
    assert a.returncode == 0, a.stderr[-3000:]
    b = run_cli(["train", *common, "trainer=ddp_cpu", "trainer.devices=2", "data.batch_size=8", f"hydra.run.dir={ddp}"], tmp_path)
    assert b.returncode == 0, b.stderr[-3000:]
    sa, sb = (load_ckpt(d / "checkpoints" / "last.ckpt")["state_dict"] for d in (single, ddp))
    wa, wb = subtree(sa, "denoiser."), subtree(sb, "denoiser.")
    assert max(float((wa[k] - subtree(sa, "ema.")[k]).abs().max()) for k in wa) > 0  # it trained
    for k in wa:  # gradients summed over ranks in another order: equal up to float rounding
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
