"""Progressive distillation (Salimans & Ho 2022, Algorithm 2): one student step matches two teacher steps.

The student samples with `sampler=ddim spacing=trailing steps=N` (deterministic DDIM on the levels
t_i = T i/N, i = N..1, then the x0 prediction at T/N, i.e. a last step to noise level 0); its teacher
samples the same way with 2N steps, whose levels are the student's plus the midpoints T (i - 1/2)/N.
For a draw x_t at a student level t = T i/N the target is the x0 that makes one DDIM step of the
student from t to t'' = T (i - 1)/N land where two DDIM steps of the teacher land (t -> t' -> t''). In
the variables y = x/alpha, s = sigma/alpha (every SDE is then y = x0 + s eps) a DDIM step from s to s''
with prediction x0 is y'' = x0 + (s''/s)(y - x0), so

    x0_target = (y''_teacher - (s''/s) y) / (1 - s''/s),

the paper's x~ = (z'' - (sigma''/sigma) z)/(alpha'' - (sigma''/sigma) alpha) divided through by alpha''.
At the last level (i = 1) t'' is noise level 0 (s'' = 0, where every diffctl sampler ends), so the
target is the teacher's x0 prediction at the midpoint. The loss is the paper's truncated-SNR weighting
max(SNR, 1) ||x0_hat - x0_target||^2 with SNR = alpha^2/sigma^2 = 1/s^2 ("snr" drops the truncation,
weight SNR). The student starts from the teacher's weights (the paper's initialization) and keeps its
parameterization; Salimans & Ho use v or x0 prediction, since eps prediction turns x0 = (x - sigma eps)/alpha
into a large amplification at t ~ T, where a one-step student must predict x0.

Where we differ: the paper draws t on a uniform grid of [0, 1] with the cosine schedule, and its last
teacher step ends at t = 0 of that schedule; here the grid is diffctl's trailing one on [0, T] of the
run's SDE and the end is noise level 0. The teacher's x0 is clipped to the data range when sampling
would clip it (`clip_teacher`: null = as `diffctl sample`'s default, for image models), so the student
learns what the sample command's teacher does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from diffctl.denoiser import DiffusionModel
from diffctl.objectives.base import Objective
from diffctl.prediction import own_prediction
from diffctl.rng import BatchRandom
from diffctl.sde import SDE, broadcast

WEIGHTINGS = ("truncated_snr", "snr")


class ProgressiveObjective(Objective):
    """Distil `teacher` (a checkpoint path; the training module loads it) into a student of
    `student_steps` DDIM steps, half the teacher's. `teacher` is the model attach_teacher loads."""

    prediction = own_prediction("progressive")
    init_from_teacher = True  # the paper's initialization; the student has the teacher's architecture
    model_from_teacher = True  # the student's network, SDE and denoiser config are the teacher's (diffctl.teacher)

    def __init__(self, sde: SDE, teacher: str | None = None, student_steps: int = 1, weighting: str = "truncated_snr",
                 clip_teacher: bool | None = None):  # fmt: skip
        super().__init__(sde)
        if not isinstance(student_steps, int) or student_steps < 1:
            raise ValueError(f"objective.student_steps must be an integer >= 1, got {student_steps!r}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"objective.weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
        self.teacher_path, self.student_steps, self.weighting, self.clip_teacher = teacher, student_steps, weighting, clip_teacher
        self.teacher: DiffusionModel | None = None  # loaded by diffctl.train (attach_teacher)

    def levels(self, i: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Times (float64) of student level i (1..N), the teacher's midpoint and the next student level."""
        n, T = self.student_steps, self.sde.T
        i = i.to(torch.float64)
        return T * i / n, T * (i - 0.5) / n, T * (i - 1) / n

    def _teacher_x0(self, x: Tensor, t: Tensor, cond) -> Tensor:
        x0 = self.teacher(x, t, cond).x0
        clip = self.clip_teacher if self.clip_teacher is not None else self.teacher.capabilities.data_range is not None
        if clip:
            lo, hi = self.teacher.capabilities.data_range or (-1.0, 1.0)
            x0 = x0.clamp(lo, hi)
        return x0

    def ratio(self, t: Tensor) -> Tensor:
        """s = sigma/alpha at t (float64), with t = 0 meaning noise level 0 (the samplers' end)."""
        return torch.where(t > 0, self.sde.noise_ratio(t.clamp_min(self.sde.eps)), torch.zeros_like(t))

    @torch.no_grad()
    def target(self, x: Tensor, i: Tensor, cond) -> Tensor:
        """The student's x0 target at x = x_t, t = level i: two teacher DDIM steps, solved for x0."""
        t, t_mid, t_next = self.levels(i)
        s, s_mid, s_next = (broadcast(self.ratio(v), x).to(x.dtype) for v in (t, t_mid, t_next))
        alpha, alpha_mid = (broadcast(self.sde.alpha(v), x).to(x.dtype) for v in (t, t_mid))
        y = x / alpha
        x0 = self._teacher_x0(x, t.to(x.dtype), cond)
        y_mid = x0 + (s_mid / s) * (y - x0)
        x0 = self._teacher_x0(alpha_mid * y_mid, t_mid.to(x.dtype), cond)
        y_next = x0 + (s_next / s_mid) * (y_mid - x0)
        ratio = s_next / s
        return (y_next - ratio * y) / (1.0 - ratio)

    def weight(self, t: Tensor) -> Tensor:
        snr = 1.0 / self.ratio(t) ** 2
        return snr.clamp_min(1.0) if self.weighting == "truncated_snr" else snr

    def loss(self, model: DiffusionModel, x0: Tensor, cond: dict | None, rng: BatchRandom, **_) -> Tensor:
        if self.teacher is None:
            raise RuntimeError("objective=progressive needs its teacher: set objective.teacher (diffctl.train loads it)")
        i = rng.randint(self.student_steps, (x0.shape[0],)) + 1
        t = self.levels(i)[0]
        noise = rng.randn(x0.shape, x0.dtype)
        x = self.sde.marginal(x0, t.to(x0.dtype), noise)
        target = self.target(x, i, cond)
        pred = model(x, t.to(x0.dtype), cond).x0
        return (self.weight(t).to(x0.dtype) * (pred - target).pow(2).flatten(1).mean(1)).mean()
