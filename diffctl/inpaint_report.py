"""What `diffctl inpaint` reports: PSNR and SSIM on the inpainted region against the original
images, and the PNG grid (input | mask | result per row).

Both metrics count only the unknown pixels (mask 0), the ones the model made: the known pixels are
the input exactly and would only inflate the scores. Images are in [-1, 1] (data range 2).
- PSNR: per image 10 log10(2^2 / MSE) with the MSE over its unknown pixels and all channels; the
  mean over images (inf when an image is reproduced exactly, as identical images have).
- SSIM (Wang et al. 2004): the SSIM map with an 11 x 11 Gaussian window of std 1.5, K1 = 0.01,
  K2 = 0.03, reflection padding at the borders (torchmetrics' convention), averaged over each
  image's unknown pixels and channels; then over images. For images under 6 pixels a side the window
  shrinks to what reflection padding allows.
- LPIPS (diffctl/lpips.py, backbone weights from a local file): `lpips` over the whole image, as
  RePaint reports it (the known pixels are equal, so it scores the fill in its context), and
  `lpips_masked`, its spatial map averaged over the unknown pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from diffctl.images import make_grid, to_uint8

DATA_RANGE = 2.0  # pixels in [-1, 1]


def _unknown(mask: Tensor, x: Tensor) -> Tensor:
    """Float weights [N, C, H, W], 1 on the unknown (inpainted) pixels."""
    return (mask.to(x.device) == 0).to(x.dtype).expand_as(x)


def masked_psnr(result: Tensor, original: Tensor, mask: Tensor) -> Tensor:
    """PSNR in dB of each image's unknown region [N] (mask: 1 = known)."""
    w = _unknown(mask, original)
    mse = ((result.to(original.dtype) - original) ** 2 * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1)
    return 10 * torch.log10(DATA_RANGE**2 / mse)


def _gaussian_window(size: int, std: float, dtype, device) -> Tensor:
    r = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * std * std))
    return g / g.sum()


def ssim_map(a: Tensor, b: Tensor, window: int = 11, std: float = 1.5) -> Tensor:
    """SSIM at every pixel [N, C, H, W] of images in [-1, 1]: local means, variances and covariance
    under a Gaussian window (reflection-padded borders)."""
    a, b = a.double(), b.double()
    c = a.shape[1]
    pad = min((window - 1) // 2, a.shape[-2] - 1, a.shape[-1] - 1)
    g = _gaussian_window(2 * pad + 1, std, a.dtype, a.device)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, 2 * pad + 1, 2 * pad + 1)

    def blur(x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), kernel, groups=c)

    c1, c2 = (0.01 * DATA_RANGE) ** 2, (0.03 * DATA_RANGE) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a = (blur(a * a) - mu_a**2).clamp_min(0)
    var_b = (blur(b * b) - mu_b**2).clamp_min(0)
    cov = blur(a * b) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))


def masked_ssim(result: Tensor, original: Tensor, mask: Tensor) -> Tensor:
    """Mean SSIM of each image's unknown region [N] (mask: 1 = known)."""
    m = ssim_map(result, original)
    w = _unknown(mask, m)
    return (m * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1)


def region_metrics(result: Tensor, original: Tensor, mask: Tensor, lpips=None) -> dict[str, float | None]:
    """{"psnr_masked", "ssim_masked"} and, given lpips (a diffctl.lpips.LPIPS), {"lpips", "lpips_masked"}:
    the means over images, for metrics.json."""
    out = {"psnr_masked": float(masked_psnr(result, original, mask).mean()),
           "ssim_masked": float(masked_ssim(result, original, mask).mean())}  # fmt: skip
    if lpips is not None:
        result = result.to(original.dtype)
        out["lpips"] = float(lpips.scores(result, original).mean())
        out["lpips_masked"] = float(lpips.scores(result, original, (mask == 0).to(original.dtype)).mean())
    return out


def inpaint_grid(inputs: Tensor, mask: Tensor, result: Tensor) -> Tensor:
    """uint8 HWC grid: one row per image, columns input | mask (white = known) | result."""
    n, c = inputs.shape[:2]
    shown = (mask.to(inputs.dtype) * 2 - 1).expand(n, c, *inputs.shape[2:])
    rows = torch.stack([to_uint8(inputs), to_uint8(shown), to_uint8(result)], 1)  # [N, 3, H, W, C]
    return torch.from_numpy(make_grid(rows.reshape(3 * n, *rows.shape[2:]), nrow=3))
