"""Consistency training and distillation (Song et al. 2023)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffctl.denoiser import DiffusionModel
from diffctl.objectives.base import Objective
from diffctl.prediction import own_prediction
from diffctl.rng import BatchRandom, same_global_draws
from diffctl.sde import SDE, broadcast

TARGET_DECAY_RULES = ("paper", "code")


class ConsistencyObjective(Objective):
    """Consistency training (CT) and distillation (CD), Song et al. 2023.

    Works in the VE variables y = x/alpha(t), s = sigma(t)/alpha(t), where every SDE here is VE, so
    the paper's recipe applies unchanged: Karras boundaries s_1 < ... < s_N (rho=7) between
    s(eps) and s(1); N(k) grows from `num_scales_start` to `num_scales_end` over training; the
    target network is an EMA with decay mu(k) = exp(s0 log mu0 / N(k)) (the paper's formula;
    `target_decay_rule="code"`: openai/consistency_models' exp(s0 log mu0 / (N(k) - 1))). CT uses
    the unbiased one-sample score estimate, so x_n shares the noise of x_{n+1}; CD takes one Heun
    step of the teacher's probability-flow ODE from x_{n+1} (`teacher` set by the training module),
    whose weights also initialize the student when `init_from_teacher` (done in diffctl.train).
    The target network sees the dropout masks the online network drew (same global RNG state).
    """

    prediction = own_prediction("consistency")
    needs_target = True

    def __init__(
        self,
        sde: SDE,
        num_scales_start: int = 2,
        num_scales_end: int = 150,
        target_decay_start: float = 0.9,
        rho: float = 7.0,
        metric: str = "l2",
        total_steps: int = 1,
        teacher: str | None = None,
        init_from_teacher: bool = True,
        target_decay_rule: str = "paper",
    ):
        super().__init__(sde)
        if not 2 <= num_scales_start <= num_scales_end:
            raise ValueError("objective.num_scales_start must be >= 2 and <= objective.num_scales_end")
        if metric not in ("l2", "l1", "pseudo_huber"):
            raise ValueError(f"objective.metric must be l2, l1 or pseudo_huber, got {metric!r}")
        if target_decay_rule not in TARGET_DECAY_RULES:
            raise ValueError(f"objective.target_decay_rule must be paper or code, got {target_decay_rule!r}")
        if not isinstance(init_from_teacher, bool):
            raise ValueError(f"objective.init_from_teacher must be true or false, got {init_from_teacher!r}")
        self.s0, self.s1 = int(num_scales_start), int(num_scales_end)
        self.mu0, self.rho, self.metric = float(target_decay_start), float(rho), metric
        self.total_steps = max(int(total_steps), 1)
        self.teacher_path = teacher
        self.init_from_teacher = init_from_teacher
        self.target_decay_rule = target_decay_rule
        self.teacher: DiffusionModel | None = None  # loaded by the training module when teacher_path is set

    def num_scales(self, step: int) -> int:
        """N(k) of the CT paper: sqrt-growth from s0 to s1 discretization steps (+1 boundaries)."""
        frac = min(step, self.total_steps) / self.total_steps
        n = math.ceil(math.sqrt(frac * ((self.s1 + 1) ** 2 - self.s0**2) + self.s0**2) - 1) + 1
        return max(n, 2)

    def target_decay(self, step: int) -> float:
        """mu(k): the paper divides s0 log mu0 by N(k), the reference code by N(k) - 1."""
        n = self.num_scales(step) - (1 if self.target_decay_rule == "code" else 0)
        return math.exp(self.s0 * math.log(self.mu0) / n)

    def boundaries(self, n: int, device=None) -> Tensor:
        """N Karras noise ratios from s(eps) to s(1), increasing, float64."""
        s_min = float(self.sde.noise_ratio(torch.tensor(self.sde.eps, dtype=torch.float64)))
        s_max = float(self.sde.noise_ratio(torch.tensor(self.sde.T, dtype=torch.float64)))
        i = torch.arange(n, dtype=torch.float64, device=device) / (n - 1)
        inv = 1.0 / self.rho
        return (s_min**inv + i * (s_max**inv - s_min**inv)) ** self.rho

    def distance(self, a: Tensor, b: Tensor) -> Tensor:
        diff = (a - b).flatten(1)
        if self.metric == "l2":
            return diff.pow(2).mean(1)
        if self.metric == "l1":
            return diff.abs().mean(1)
        c = 0.00054 * math.sqrt(diff.shape[1])  # iCT's pseudo-Huber constant, scaled with dimension
        return torch.sqrt(diff.pow(2).sum(1) + c * c) - c

    def _times(self, s: Tensor, dtype) -> Tensor:
        t = self.sde.t_from_noise_ratio(s).to(dtype)
        return t.clamp(self.sde.eps, self.sde.T)

    @torch.no_grad()
    def _teacher_step(self, y: Tensor, s_hi: Tensor, s_lo: Tensor, t_hi: Tensor, t_lo: Tensor, cond) -> Tensor:
        """One Heun step of dy/ds = (y - x0(y, s)) / s from s_hi down to s_lo (teacher's PF-ODE)."""

        def slope(y_, s_, t_):
            alpha = broadcast(self.sde.alpha(t_), y_)
            return (y_ - self.teacher(alpha * y_, t_, cond).x0) / broadcast(s_, y_)

        h = broadcast(s_lo - s_hi, y)
        d1 = slope(y, s_hi, t_hi)
        y_euler = y + h * d1
        return y + h * 0.5 * (d1 + slope(y_euler, s_lo, t_lo))

    def loss(
        self, model: DiffusionModel, x0: Tensor, cond: dict | None, rng: BatchRandom, *, target: DiffusionModel, step: int, **_
    ) -> Tensor:
        n_scales = self.num_scales(step)
        bounds = self.boundaries(n_scales, device=x0.device)
        idx = rng.randint(n_scales - 1, (x0.shape[0],))
        s_lo, s_hi = bounds[idx], bounds[idx + 1]
        t_lo, t_hi = self._times(s_lo, x0.dtype), self._times(s_hi, x0.dtype)
        s_lo, s_hi = s_lo.to(x0.dtype), s_hi.to(x0.dtype)
        noise = rng.randn(x0.shape, x0.dtype)
        y_hi = x0 + broadcast(s_hi, x0) * noise
        if self.teacher is None:
            y_lo = x0 + broadcast(s_lo, x0) * noise
        else:
            y_lo = self._teacher_step(y_hi, s_hi, s_lo, t_hi, t_lo, cond)
        # The target runs in train mode from the global RNG state the online call started from, so
        # both draw the same dropout masks (the reference saves and restores the RNG state).
        with same_global_draws(x0.device):
            online = model(broadcast(self.sde.alpha(t_hi), x0) * y_hi, t_hi, cond).x0
        with torch.no_grad():
            tgt = target(broadcast(self.sde.alpha(t_lo), x0) * y_lo, t_lo, cond).x0
        return self.distance(online, tgt).mean()
