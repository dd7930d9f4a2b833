"""Samplers: pure functions of a denoiser, its SDE, a start noise and per-sample generators.

Each takes `denoiser(x, t, labels) -> Prediction` and returns x0 (float, unclipped). Sample i draws
all its noise from its own CPU generator seeded by (seed, i), so it is the same image whatever the
batch size, the number of devices or the device type.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from diffctl.denoiser import Denoiser
from diffctl.rng import mix_seed
from diffctl.sde import _bcast


def sample_generators(seed: int, indices) -> list[torch.Generator]:
    """One CPU generator per sample index, seeded by (seed, index)."""
    return [torch.Generator().manual_seed(mix_seed(seed, int(i))) for i in indices]


def _randn(generators: list[torch.Generator], shape, dtype=torch.float32, device=None) -> Tensor:
    """A batch of standard normals of per-sample `shape`, row i drawn from generators[i]."""
    return torch.stack([torch.randn(shape, generator=g, dtype=dtype) for g in generators]).to(device)


def _randn_like(x: Tensor, generators: list[torch.Generator]) -> Tensor:
    return _randn(generators, x.shape[1:], x.dtype, x.device)


def time_grid(denoiser: Denoiser, steps: int, device) -> Tensor:
    """steps+1 uniformly spaced times from T down to eps."""
    sde = denoiser.sde
    return torch.linspace(sde.T, sde.eps, steps + 1, device=device, dtype=torch.float64)


@torch.inference_mode()
def euler_maruyama(denoiser: Denoiser, x: Tensor, steps: int, labels=None, generators=None) -> Tensor:
    """Reverse-time SDE dx = [f - g^2 score] dt + g dw, Euler-Maruyama; the last step returns the
    denoised x0 prediction instead of adding noise (as in Song et al. 2021)."""
    sde = denoiser.sde
    ts = time_grid(denoiser, steps, x.device)
    for i in range(steps):
        t = ts[i].to(x.dtype).expand(x.shape[0])
        dt = float(ts[i + 1] - ts[i])  # negative
        pred = denoiser(x, t, labels)
        g = _bcast(sde.diffusion(t), x)
        x = x + (sde.drift(x, t) - g * g * pred.score) * dt + g * abs(dt) ** 0.5 * _randn_like(x, generators)
    return denoiser(x, ts[-1].to(x.dtype).expand(x.shape[0]), labels).x0


@torch.inference_mode()
def heun_ode(denoiser: Denoiser, x: Tensor, steps: int, labels=None, generators=None) -> Tensor:
    """Probability-flow ODE dx/dt = f - g^2 score / 2 with Heun's method (2 NFE per step)."""
    sde = denoiser.sde

    def velocity(x_, t_):
        t_ = t_.to(x_.dtype).expand(x_.shape[0])
        g = _bcast(sde.diffusion(t_), x_)
        return sde.drift(x_, t_) - 0.5 * g * g * denoiser(x_, t_, labels).score

    ts = time_grid(denoiser, steps, x.device)
    for i in range(steps):
        dt = float(ts[i + 1] - ts[i])
        d1 = velocity(x, ts[i])
        x_euler = x + dt * d1
        x = x + dt * 0.5 * (d1 + velocity(x_euler, ts[i + 1]))
    return denoiser(x, ts[-1].to(x.dtype).expand(x.shape[0]), labels).x0


@torch.inference_mode()
def consistency(denoiser: Denoiser, x: Tensor, steps: int, labels=None, generators=None) -> Tensor:
    """Consistency sampling: one evaluation at T, then (steps-1) re-noise/denoise rounds at noise
    ratios spaced uniformly between s(1) and s(eps) (multistep sampling, Song et al. 2023)."""
    sde = denoiser.sde
    n = x.shape[0]
    t_max = torch.full((n,), sde.T, device=x.device, dtype=x.dtype)
    x0 = denoiser(x, t_max, labels).x0
    s_min = float(sde.noise_ratio(torch.tensor(sde.eps, dtype=torch.float64)))
    s_max = float(sde.noise_ratio(torch.tensor(sde.T, dtype=torch.float64)))
    for s in torch.linspace(s_max, s_min, steps + 1, dtype=torch.float64)[1:-1]:
        t = sde.t_from_noise_ratio(s).to(x.dtype).expand(n).to(x.device)
        y = x0 + (float(s) ** 2 - s_min**2) ** 0.5 * _randn_like(x0, generators)
        x0 = denoiser(_bcast(sde.alpha(t), y) * y, t, labels).x0
    return x0


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "euler_maruyama": euler_maruyama,
    "heun_ode": heun_ode,
    "consistency": consistency,
}


def generate(
    denoiser: Denoiser,
    num: int,
    shape: tuple[int, ...],
    sampler: str,
    steps: int,
    seed: int = 0,
    labels: Tensor | None = None,
    device=None,
    first_index: int = 0,
) -> Tensor:
    """Samples first_index .. first_index+num-1 of `shape` for `seed`, run through `sampler`."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    generators = sample_generators(seed, range(first_index, first_index + num))
    x = denoiser.sde.prior_std() * _randn(generators, shape, device=device)
    return SAMPLERS[sampler](denoiser, x, steps, labels=labels, generators=generators)
