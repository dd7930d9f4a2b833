"""Progressive distillation (Salimans & Ho 2022): the objective's target against the sampler it distils.

The oracle is diffctl's own `ddim` sampler on the teacher, which tests/test_ground_truth.py checks
against the exact mixture and tests/test_diffusers_oracle.py against diffusers' DDIMScheduler: a student
whose x0 prediction at each of its levels is the objective's target must sample, with N DDIM steps,
exactly what the teacher samples with 2N. Nothing of the target's formula is restated here.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from diffctl.conditioning import Conditioner
from diffctl.denoiser import Capabilities, ClippedModel
from diffctl.networks.gmm import GaussianMixture, MixtureModel
from diffctl.objectives import ProgressiveObjective
from diffctl.parameterization import Prediction, split
from diffctl.rng import BatchRandom
from diffctl.samplers import generate
from diffctl.sde import LinearSDE, SubVPSDE, VESDE, VPSDE, broadcast
from helpers import load_ckpt, run_sample, run_train, tiny_overrides

MIXTURE = GaussianMixture(means=[[-1.0, 0.5], [1.5, -0.5], [0.0, 2.0]], scales=[0.3, 0.5, 0.2], weights=[0.5, 0.3, 0.2])
SDES = {"vp": VPSDE(), "vpsub": SubVPSDE(), "ve": VESDE(sigma_max=20.0), "linear": LinearSDE()}
DDIM = {"name": "ddim", "spacing": "trailing"}


class PerfectStudent(nn.Module):
    """A student that predicts, at its level t = T i/N, the objective's target (two teacher DDIM steps).
    The samplers run in the noise's float32, so the identities below hold to float32 rounding."""

    def __init__(self, objective: ProgressiveObjective):
        super().__init__()
        self.objective, self.sde, self.conditioner = objective, objective.sde, Conditioner()
        self.calls = 0

    @property
    def capabilities(self):
        return Capabilities(conditions=(), num_classes=0, null_condition=True, one_step=False, data_range=None,
                            analytic=True, prediction="exact")  # fmt: skip

    def forward(self, x, t, cond=None):
        self.calls += 1
        n, T = self.objective.student_steps, self.sde.T
        i = torch.round(t.to(torch.float64) * n / T).to(torch.int64)
        assert torch.allclose(T * i.double() / n, t.double(), rtol=0, atol=1e-6), "called off the student's grid"
        alpha, sigma = (broadcast(f(t), x) for f in (self.sde.alpha, self.sde.sigma))
        x0, eps = split("x0", self.objective.target(x, i, cond), x, alpha, sigma)
        return Prediction(x0=x0, eps=eps, sigma=sigma)


def objective_for(sde, steps, teacher=None):
    objective = ProgressiveObjective(sde, student_steps=steps)
    objective.teacher = teacher or MixtureModel(MIXTURE, sde)
    return objective


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("steps", [1, 2, 5])
def test_a_student_on_the_target_samples_what_the_teacher_does_in_twice_the_steps(sde_name, steps):
    sde = SDES[sde_name]
    objective = objective_for(sde, steps)
    student = PerfectStudent(objective)
    got = generate(student, 64, (2,), DDIM, steps, seed=3)
    want = generate(objective.teacher, 64, (2,), DDIM, 2 * steps, seed=3)
    assert student.calls == steps
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # and it is not the teacher at N steps: the identity is the target's, not the grid's
    assert (generate(objective.teacher, 64, (2,), DDIM, steps, seed=3) - want).abs().max() > 1e-3


def test_two_rounds_compose_to_a_quarter_of_the_steps():
    """Round 2's teacher is round 1's student: the perfect round-2 student (1 step) samples what the
    original teacher does in 4."""
    sde = SDES["vp"]
    round1 = PerfectStudent(objective_for(sde, 2))
    round2 = PerfectStudent(objective_for(sde, 1, teacher=round1))
    got = generate(round2, 32, (2,), DDIM, 1, seed=5)
    want = generate(round1.objective.teacher, 32, (2,), DDIM, 4, seed=5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class BoundedMixture(MixtureModel):
    """The mixture's exact model declared as an image model's (data in [-1, 1]), as a trained U-Net is."""

    @property
    def capabilities(self):
        return dataclasses.replace(super().capabilities, data_range=(-1.0, 1.0))


@pytest.mark.parametrize("clip", [None, False])
def test_the_teacher_is_clipped_as_the_sample_command_clips_it(clip):
    """clip_teacher=null: a bounded teacher's x0 is clipped, so the perfect student samples what
    `diffctl sample`'s clipped teacher (ClippedModel) does in twice the steps; false: the unclipped one."""
    sde = SDES["vp"]
    wide = GaussianMixture(means=[[-1.6, 0.9], [1.4, -1.2]], scales=[0.3, 0.2])  # much of it outside [-1, 1]
    objective = objective_for(sde, 2, teacher=BoundedMixture(wide, sde))
    objective.clip_teacher = clip
    got = generate(PerfectStudent(objective), 64, (2,), DDIM, 2, seed=3)
    teacher = ClippedModel(objective.teacher) if clip is None else objective.teacher
    want = generate(teacher, 64, (2,), DDIM, 4, seed=3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert (got.abs() > 1.0).any() == (clip is False)


@pytest.mark.parametrize("weighting", ["truncated_snr", "snr"])
def test_the_loss_is_the_weighted_x0_error_to_the_target_and_zero_for_the_perfect_student(weighting):
    sde, steps, batch = SDES["vp"], 4, 256
    objective = objective_for(sde, steps)
    objective.weighting = weighting
    x0 = MIXTURE.sample(batch, torch.Generator().manual_seed(0))[0]

    def rng():
        return BatchRandom(seed=1, step=7, micro=0, rank=0, world_size=1, local_size=batch, device="cpu")

    assert objective.loss(PerfectStudent(objective), x0, None, rng()) == pytest.approx(0.0, abs=1e-20)
    # The teacher as its own student: the same draws, the loss written out here from the paper's
    # L = max(||x0 - x0_hat||^2, ||eps - eps_hat||^2) form of truncated-SNR weighting (per dimension)
    r = rng()
    i = r.randint(steps, (batch,)) + 1
    t = sde.T * i.double() / steps
    noise = r.randn(x0.shape, x0.dtype)
    x = sde.marginal(x0, t, noise)
    target = objective.target(x, i, None)
    pred = objective.teacher(x, t, None)
    alpha, sigma = broadcast(sde.alpha(t), x), broadcast(sde.sigma(t), x)
    err_x0 = (pred.x0 - target).pow(2).mean(1)
    err_eps = (pred.eps - (x - alpha * target) / sigma).pow(2).mean(1)  # the eps the target implies
    want = torch.maximum(err_x0, err_eps) if weighting == "truncated_snr" else err_eps
    got = objective.loss(objective.teacher, x0, None, rng())
    assert got > 1e-4
    assert float(got) == pytest.approx(float(want.mean()), rel=1e-10)


def test_bad_objective_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="student_steps must be an integer >= 1"):
        ProgressiveObjective(SDES["vp"], student_steps=0)
    with pytest.raises(ValueError, match="weighting must be one of truncated_snr, snr"):
        ProgressiveObjective(SDES["vp"], weighting="min_snr")


def test_diffctl_train_distils_a_checkpoint_into_its_own_model(tmp_path, trained):
    """One round end to end: the student takes the teacher's model (whatever this run's config says),
    starts from its EMA weights, trains, and samples with its steps."""
    _, teacher = trained
    student = tmp_path / "student"
    overrides = [*tiny_overrides("unet"), "model.base_channels=8", "objective=progressive",
                 f"objective.teacher={teacher}", "objective.student_steps=2", "trainer.max_steps=2"]  # fmt: skip
    run_train(student, overrides)
    got = load_ckpt(student / "checkpoints" / "last.ckpt")
    want = load_ckpt(next((teacher / "checkpoints").glob("last.ckpt")))
    mine, theirs = (c["hyper_parameters"]["config"] for c in (got, want))
    assert mine["model"] == theirs["model"] and mine["model"]["base_channels"] == 16  # base_channels=8 was not used
    assert mine["denoiser"] == theirs["denoiser"] and mine["sde"] == theirs["sde"]
    assert mine["objective"]["student_steps"] == 2
    result = run_sample(tmp_path / "samples", [f"ckpt={student}", "sampler=ddim", "sampler.spacing=trailing", "steps=2",
                                               "num_samples=4", "metrics.names=[]"])  # fmt: skip
    assert result["num_samples"] == 4
