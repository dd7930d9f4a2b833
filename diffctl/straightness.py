"""The straightness of a model's sampling paths (Liu et al. 2023, eq. 5):

    S = int_0^1 E || (Z1 - Z0) - dZ_u/du ||^2 du,

Z_u the path from the noise end (u = 0, t = T) to the data end (u = 1, t = 0) in unit time u = 1 - t/T.
S = 0 exactly when every path is a straight line run at constant speed, which is what lets one Euler
step follow it. It is measured on the path of deterministic DDIM on the trailing levels T, T(N-1)/N,
..., T/N, then x0 (the points alpha y the sampler visits): on sde=linear that is exactly the Euler
method of the rectified flow with N steps (a DDIM step from t to t' is x + (t' - t) u_hat there), whose
piecewise-linear path has velocity (x_{k+1} - x_k)/du_k on each piece, so the integral is a sum. As
N grows it converges to S of the model's probability-flow ODE. Reported per element (the squared
norm divided by C*H*W), so resolutions compare.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffctl.samplers.common import denoise, levels_of, noise_levels, start


@torch.inference_mode()
def euler_path(model, x: Tensor, steps: int, cond=None) -> tuple[list[Tensor], list[float]]:
    """The points of deterministic trailing DDIM from the prior draw x (its start at t = T) and their
    times: steps + 1 points, the last the x0 the sampler returns (t = 0)."""
    levels = levels_of(model.sde, noise_levels(model.sde, steps, "trailing"))
    y = start(x, model.sde, levels[0])
    points = [levels[0].alpha * y]
    for now, nxt in zip(levels, levels[1:]):
        pred = denoise(model, y, now, cond)
        y = pred.x0 + nxt.s * pred.eps
        points.append(nxt.alpha * y)
    points.append(denoise(model, y, levels[-1], cond).x0)
    return points, [lv.t for lv in levels] + [0.0]


def path_straightness(points: list[Tensor], times: list[float]) -> Tensor:
    """Per-sample S of a piecewise-linear path through `points` at decreasing `times` (T ... 0)."""
    total = times[0] - times[-1]
    chord = (points[-1] - points[0]).flatten(1).double()
    s = torch.zeros(chord.shape[0], dtype=torch.float64, device=chord.device)
    for a, b, ta, tb in zip(points, points[1:], times, times[1:]):
        du = (ta - tb) / total
        v = (b - a).flatten(1).double() / du
        s += du * (v - chord).pow(2).mean(1)
    return s


def straightness(model, x: Tensor, steps: int, cond=None) -> tuple[Tensor, Tensor]:
    """(per-sample straightness, the samples) of the trailing-DDIM path with `steps` steps from x."""
    points, times = euler_path(model, x, steps, cond)
    return path_straightness(points, times), points[-1]
