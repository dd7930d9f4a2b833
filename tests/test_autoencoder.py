"""diffctl's AutoencoderKL against diffusers' as the oracle: a tiny diffusers model with perturbed weights
(so every GroupNorm affine and bias matters) saved with save_pretrained, loaded through diffctl with no
diffusers code, and compared on encodings, decodings and whole forward passes; the posterior's KL and
NLL against torch.distributions; our saved folders loaded back by diffusers; the loader's one-line errors."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from diffctl.errors import ConfigError
from diffctl.first_stage import CONFIG_NAME, WEIGHTS_NAME, load_diffusers_vae, save_autoencoder
from diffctl.networks.autoencoder import AutoencoderKL
from diffctl.networks.posterior import DiagonalGaussian

diffusers = pytest.importorskip("diffusers")

TINY = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4)
CASES = {
    "f2": TINY,
    # f = 4, two ResNets per level, widths repeating (no shortcut conv), 1-channel images, odd latent width
    "f4": dict(block_out_channels=(8, 16, 16), layers_per_block=2, latent_channels=3, norm_num_groups=4, in_channels=1, out_channels=1),
    "no-quant-no-attention": dict(TINY, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False),
}


def diffusers_vae(seed: int = 0, **kw):
    levels = len(kw["block_out_channels"])
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                                  sample_size=16, **kw)  # fmt: skip
    perturb(vae, seed)
    return vae.eval()


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed + 1)
    for p in model.parameters():
        p.add_(0.2 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{case: (folder, diffusers model)} saved once for the module."""
    root = tmp_path_factory.mktemp("vaes")
    out = {}
    for name, kw in CASES.items():
        vae = diffusers_vae(**kw)
        vae.save_pretrained(root / name, safe_serialization=True)
        out[name] = (root / name, vae)
    return out


def images(channels: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(2, channels, 16, 24, generator=torch.Generator().manual_seed(seed))  # not square: rows and columns differ


@pytest.mark.parametrize("case", list(CASES))
@torch.no_grad()
def test_matches_diffusers(saved, case):
    folder, theirs = saved[case]
    ours = load_diffusers_vae(folder)
    kw = CASES[case]
    x = images(kw.get("in_channels", 3))
    want = theirs.encode(x).latent_dist
    got = ours.encode(x)
    f = 2 ** (len(kw["block_out_channels"]) - 1)
    assert got.mean.shape == (2, kw["latent_channels"], 16 // f, 24 // f) == (2, *ours.latent_shape(x.shape[1], 16, 24))
    torch.testing.assert_close(got.mean, want.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.logvar, want.logvar, atol=1e-5, rtol=1e-5)
    assert got.std.std() > 0.01 and got.mean.std() > 0.1  # the comparison is not of constants
    z = torch.randn(got.mean.shape, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, atol=1e-5, rtol=1e-5)
    recon, posterior = ours(x)
    torch.testing.assert_close(recon, theirs(x).sample, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(posterior.mode(), want.mode(), atol=1e-5, rtol=1e-5)
    # a posterior draw from the same generator as diffusers' (torch.randn of the latent's shape)
    drawn, _ = ours(x, sample_posterior=True, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(drawn, theirs(x, sample_posterior=True, generator=torch.Generator().manual_seed(5)).sample, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(drawn, recon)


def test_state_dict_is_diffusers_layout():
    for kw in CASES.values():
        theirs = diffusers_vae(**kw).state_dict()
        ours = AutoencoderKL(**kw).state_dict()
        assert sorted(ours) == sorted(theirs)
        assert all(ours[k].shape == theirs[k].shape for k in ours)


def test_defaults_are_diffusers_defaults(tmp_path):
    """A config.json with only the class name builds what diffusers builds from it (one 64-wide level)."""
    from safetensors.torch import save_file

    theirs = diffusers.AutoencoderKL()
    (tmp_path / CONFIG_NAME).write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    save_file(theirs.state_dict(), str(tmp_path / WEIGHTS_NAME))
    ours = load_diffusers_vae(tmp_path)  # strict: every key and shape of diffusers' default model
    for key, value in ours.config.items():
        assert value == (list(theirs.config[key]) if key == "block_out_channels" else theirs.config[key]), key


def test_saved_folder_loads_in_diffusers_and_back(tmp_path):
    ours = AutoencoderKL(**CASES["f4"], scaling_factor=0.5, shift_factor=0.1)
    perturb(ours, 11)
    save_autoencoder(ours, tmp_path / "ae")
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "ae").eval()
    assert theirs.config.scaling_factor == 0.5 and theirs.config.shift_factor == 0.1
    back = load_diffusers_vae(tmp_path / "ae")
    assert back.config == ours.config
    x = images(1)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], theirs(x).sample, atol=1e-5, rtol=1e-5)
        assert torch.equal(back(x)[0], ours.eval()(x)[0])
    with pytest.raises(ConfigError, match="already exists"):
        save_autoencoder(ours, tmp_path / "ae")


def test_old_attention_names_load(saved, tmp_path):
    """Folders saved by diffusers < 0.14 call the attention projections query/key/value/proj_attn."""
    from safetensors.torch import load_file, save_file

    folder, theirs = saved["f2"]
    shutil.copytree(folder, tmp_path / "old")
    state = load_file(str(tmp_path / "old" / WEIGHTS_NAME))
    new = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for k, v in state.items():
        for a, b in new.items():
            k = k.replace(f".attentions.0.{a}.", f".attentions.0.{b}.")
        renamed[k] = v
    assert sum(".proj_attn." in k for k in renamed) == 4  # encoder and decoder, weight and bias
    save_file(renamed, str(tmp_path / "old" / WEIGHTS_NAME))
    x = images(3)
    with torch.no_grad():
        torch.testing.assert_close(load_diffusers_vae(tmp_path / "old")(x)[0], theirs(x).sample, atol=1e-5, rtol=1e-5)


def test_latent_shape_and_normalization():
    ae = AutoencoderKL(**CASES["f4"], scaling_factor=0.5, shift_factor=0.25)
    assert ae.factor == 4 and ae.latent_shape(1, 28, 32) == (3, 7, 8)
    with pytest.raises(ConfigError, match="multiples of 4"):
        ae.latent_shape(1, 30, 32)
    with pytest.raises(ConfigError, match="in_channels=1"):
        ae.latent_shape(3, 28, 28)
    z = torch.randn(2, 3, 7, 8)
    torch.testing.assert_close(ae.normalize(z), (z - 0.25) * 0.5)
    torch.testing.assert_close(ae.denormalize(ae.normalize(z)), z)
    assert ae.last_layer is ae.decoder.conv_out.weight


def moments(seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(3, 8, 5, 6, generator=torch.Generator().manual_seed(seed))


def test_posterior_against_torch_distributions():
    q, p = DiagonalGaussian(moments(0)), DiagonalGaussian(moments(1))
    qn, pn = Normal(q.mean, q.std), Normal(p.mean, p.std)
    standard = Normal(torch.zeros_like(q.mean), torch.ones_like(q.mean))
    torch.testing.assert_close(q.kl(), kl_divergence(qn, standard).flatten(1).sum(1))
    torch.testing.assert_close(q.kl(p), kl_divergence(qn, pn).flatten(1).sum(1))
    z = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(q.nll(z), -qn.log_prob(z).flatten(1).sum(1))
    torch.testing.assert_close(q.sample(noise=z), q.mean + q.std * z)
    torch.testing.assert_close(q.var, q.std**2)
    assert q.mode() is q.mean and q.kl().shape == (3,)
    with pytest.raises(ValueError, match="noise of shape"):
        q.sample(noise=z[:, :2])


def test_posterior_clamp_and_sampling_match_diffusers():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    m = moments(3, scale=40.0)  # log-variances far outside [-30, 20]
    ours, theirs = DiagonalGaussian(m), DiagonalGaussianDistribution(m)
    assert ours.logvar.max() == 20.0 and ours.logvar.min() == -30.0
    torch.testing.assert_close(ours.logvar, theirs.logvar)
    torch.testing.assert_close(ours.kl(), theirs.kl())
    z = torch.randn(ours.shape, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(ours.nll(z), theirs.nll(z))
    torch.testing.assert_close(ours.sample(torch.Generator().manual_seed(5)), theirs.sample(torch.Generator().manual_seed(5)))
    # the clamp closed form: exp(0.5 * 20) is the largest std
    assert math.isclose(ours.std.max().item(), math.exp(10.0), rel_tol=1e-6)
