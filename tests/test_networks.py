"""Tests for the denoising networks (U-Net and DiT)."""

from __future__ import annotations

import copy
from pathlib import Path

import hydra.utils
import pytest
import torch
from omegaconf import OmegaConf

from diffctl.networks import DiT, UNet

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"

TINY_UNET = dict(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0)
TINY_DIT = dict(hidden_size=32, depth=2, num_heads=2)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    # These nets are tiny: intra-op threads only add overhead, and thrash badly when
    # other processes share the cores. Restore the setting for the rest of the session.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def randomize_(net: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    # Zero-init layers make a fresh net output exactly 0 everywhere; perturbing every
    # parameter lets tests observe how the output depends on the inputs.
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return net


def make(kind: str, **kw) -> torch.nn.Module:
    return UNet(**{**TINY_UNET, **kw}) if kind == "unet" else DiT(**{**TINY_DIT, **kw})


# ---------------------------------------------------------------- shapes
@pytest.mark.parametrize("num_classes", [0, 10])
@pytest.mark.parametrize("in_ch,res,mult", [(1, 8, (1, 2)), (3, 16, (1, 2, 2)), (3, 32, (1, 2, 2, 2))])
def test_unet_shapes(in_ch, res, mult, num_classes):
    net = make("unet", in_channels=in_ch, resolution=res, channel_mult=mult, num_classes=num_classes)
    x = torch.randn(3, in_ch, res, res)
    labels = torch.tensor([0, 1, num_classes]) if num_classes else None
    assert net(x, torch.rand(3) * 1000, labels).shape == x.shape
    wide = make("unet", in_channels=in_ch, resolution=res, channel_mult=mult, out_channels=2 * in_ch)
    assert wide(x, torch.rand(3) * 1000).shape == (3, 2 * in_ch, res, res)
    assert (net.in_channels, net.out_channels, net.resolution, net.num_classes) == (in_ch, in_ch, res, num_classes)


@pytest.mark.parametrize("num_classes", [0, 10])
@pytest.mark.parametrize("in_ch,res,patch", [(1, 8, 1), (1, 8, 2), (3, 16, 4), (4, 32, 2), (3, 12, 3)])
def test_dit_shapes(in_ch, res, patch, num_classes):
    net = make("dit", in_channels=in_ch, resolution=res, patch_size=patch, num_classes=num_classes)
    x = torch.randn(3, in_ch, res, res)
    labels = torch.tensor([0, 1, num_classes]) if num_classes else None
    assert net(x, torch.rand(3) * 1000, labels).shape == x.shape
    learned_sigma = make("dit", in_channels=in_ch, resolution=res, patch_size=patch, out_channels=2 * in_ch)
    assert learned_sigma(x, torch.rand(3) * 1000).shape == (3, 2 * in_ch, res, res)
    assert (net.in_channels, net.out_channels, net.resolution, net.num_classes) == (in_ch, in_ch, res, num_classes)


def test_dit_unpatchify_keeps_patches_in_place():
    # Without blocks there is no token mixing, so a pixel change may only affect its own patch.
    net = randomize_(DiT(in_channels=2, resolution=8, patch_size=2, hidden_size=32, depth=0, num_heads=2)).eval()
    x, t = torch.randn(1, 2, 8, 8), torch.tensor([3.0])
    x2 = x.clone()
    x2[0, 1, 5, 2] += 1.0  # pixel in patch row 2, patch column 1
    changed = (net(x2, t) - net(x, t)).abs().sum(dim=(0, 1)) > 0
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[4:6, 2:4] = True
    assert torch.equal(changed, expected)


def test_non_integer_noise_labels():
    for kind in ("unet", "dit"):
        net = randomize_(make(kind, in_channels=1, resolution=8)).eval()
        x = torch.randn(2, 1, 8, 8)
        a, b = net(x, torch.tensor([10.0, 10.0])), net(x, torch.tensor([10.37, 10.37]))
        assert torch.isfinite(b).all() and not torch.allclose(a, b)


# ---------------------------------------------------------------- parameter counts
def test_unet_ddpm_cifar10_param_count():
    with torch.device("meta"):
        net = UNet(in_channels=3, resolution=32)  # defaults are the DDPM CIFAR-10 model
    assert abs(n_params(net) - 35_746_307) / 35_746_307 < 0.005


def test_unet_cifar_yaml_is_ddpm_preset():
    cfg = OmegaConf.load(CONF / "unet_cifar.yaml")
    with torch.device("meta"):
        net = hydra.utils.instantiate(cfg, in_channels=3, resolution=32, num_classes=0)
    assert abs(n_params(net) - 35_746_307) / 35_746_307 < 0.005


@pytest.mark.parametrize("size,expected", [("S", 33.0e6), ("B", 130.5e6), ("L", 458.1e6), ("XL", 675.1e6)])
def test_dit_paper_param_counts(size, expected):
    # ImageNet 256 latent setup: 4x32x32 latents, learned sigma (8 outputs), 1000 classes.
    with torch.device("meta"):
        net = DiT(in_channels=4, resolution=32, patch_size=2, out_channels=8, num_classes=1000, size=size)
    assert abs(n_params(net) - expected) / expected < 0.005
    if size == "XL":
        # The reference code stores the fixed position table as a frozen parameter; with it we match exactly.
        assert n_params(net) + net.pos_embed.numel() == 675_129_632


def test_dit_pos_embed_is_fixed_buffer():
    net = make("dit", in_channels=1, resolution=8)
    assert "pos_embed" in dict(net.named_buffers())
    assert all("pos_embed" not in name for name, _ in net.named_parameters())


# ---------------------------------------------------------------- class conditioning
@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_class_conditioning(kind):
    torch.manual_seed(0)
    net = randomize_(make(kind, in_channels=1, resolution=8, num_classes=10)).eval()
    assert net.null_class == 10
    x, t = torch.randn(4, 1, 8, 8), torch.full((4,), 500.0)
    out_a = net(x, t, torch.zeros(4, dtype=torch.long))
    out_b = net(x, t, torch.full((4,), 3, dtype=torch.long))
    assert (out_a - out_b).abs().max() > 1e-3, "class labels do not reach the output"
    out_null = net(x, t, torch.full((4,), net.null_class, dtype=torch.long))
    assert torch.equal(net(x, t, None), out_null), "None must mean the null class"
    assert (out_null - out_a).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_class_conditioning_learned(kind):
    # After a few steps on class-dependent targets, a fresh (zero-init) net separates the classes.
    torch.manual_seed(0)
    net = make(kind, in_channels=1, resolution=8, num_classes=2)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    x, t = torch.randn(8, 1, 8, 8), torch.full((8,), 100.0)
    y = torch.arange(8) % 2
    target = (2.0 * y - 1.0)[:, None, None, None].expand_as(x)
    for _ in range(15):
        loss = (net(x, t, y) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        gap = (net(x, t, torch.ones_like(y)) - net(x, t, torch.zeros_like(y))).mean()
    assert gap > 0.5


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_unconditional_ignores_labels(kind):
    net = randomize_(make(kind, in_channels=1, resolution=8, num_classes=0)).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([5.0, 900.0])
    assert torch.equal(net(x, t), net(x, t, torch.tensor([1, 2])))


# ---------------------------------------------------------------- gradient checkpointing
@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_gradient_checkpointing_matches(kind):
    extra = {"dropout": 0.1} if kind == "unet" else {}  # checkpointing must replay dropout masks too
    torch.manual_seed(0)
    ref = randomize_(make(kind, in_channels=1, resolution=8, num_classes=3, **extra)).train()
    ckpt = copy.deepcopy(ref)
    ckpt.gradient_checkpointing = True
    x, t, y = torch.randn(4, 1, 8, 8), torch.rand(4) * 1000, torch.tensor([0, 1, 2, 3])
    outs = []
    for net in (ref, ckpt):
        torch.manual_seed(1)
        out = net(x, t, y)
        out.pow(2).mean().backward()
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1])
    for (name, p_ref), p_ck in zip(ref.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(p_ref.grad, p_ck.grad, msg=name)


def test_gradient_checkpointing_constructor_flag():
    assert make("unet", in_channels=1, resolution=8, gradient_checkpointing=True).gradient_checkpointing
    assert make("dit", in_channels=1, resolution=8, gradient_checkpointing=True).gradient_checkpointing


# ---------------------------------------------------------------- bad configuration
def test_bad_resolution_errors():
    with pytest.raises(ValueError, match="channel_mult"):
        UNet(in_channels=3, resolution=28, channel_mult=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="patch_size"):
        DiT(in_channels=3, resolution=10, patch_size=4)
    with pytest.raises(ValueError, match="size"):
        DiT(in_channels=3, resolution=8, size="M")


# ---------------------------------------------------------------- learning
@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_tiny_net_overfits(kind):
    torch.manual_seed(0)
    net = make(kind, in_channels=1, resolution=8)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    x, t = torch.randn(16, 1, 8, 8), torch.rand(16) * 1000
    target = torch.randn(16, 1, 8, 8)
    first = None
    for _ in range(60):
        loss = (net(x, t) - target).pow(2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first, f"{first:.3f} -> {loss.item():.3f}"


# ---------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["unet", "unet_cifar", "dit"])
def test_yaml_configs_instantiate(name):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    res, ch = (32, 3) if name == "unet_cifar" else (8, 1)
    ctx = torch.device("meta") if name == "unet_cifar" else torch.device("cpu")
    with ctx:
        net = hydra.utils.instantiate(cfg, in_channels=ch, resolution=res, num_classes=10)
    assert net.num_classes == 10 and net.null_class == 10
    if name != "unet_cifar":
        x = torch.randn(2, ch, res, res)
        assert net(x, torch.rand(2) * 1000, torch.tensor([0, 10])).shape == x.shape
