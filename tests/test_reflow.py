"""Reflow (issue 19): the straightness measure against the exact flow of a Gaussian, the reflow loss
against the exact velocity of a known coupling, and `diffctl reflow` end to end as a user runs it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffctl.denoiser import Prediction
from diffctl.networks.gmm import GaussianMixture, MixtureModel
from diffctl.objectives import FlowObjective, ReflowObjective
from diffctl.pairs import NOISE
from diffctl.parameterization import split_velocity
from diffctl.rng import BatchRandom
from diffctl.sde import LinearSDE, broadcast
from diffctl.straightness import straightness
from helpers import edm_detector, load_ckpt, run_cli, run_train, tiny_overrides


def test_straightness_of_a_gaussian_is_that_of_its_exact_flow():
    """For Gaussian data N(mu, diag(v)) under x_t = (1-t) x0 + t eps the probability-flow ODE keeps the
    z-score: x(t) = m_t + (s_t/s_T)(x_T - m_T), m_t = (1-t) mu, s_t^2 = (1-t)^2 v + t^2. Its straightness
    (Liu et al. eq. 5, in unit time u = 1 - t/T) by quadrature equals the Euler path's for many steps."""
    mu, var = np.array([1.0, -0.5]), np.array([0.3, 0.05])
    sde = LinearSDE()
    model = MixtureModel(GaussianMixture(means=[mu.tolist()], covariances=[np.diag(var).tolist()]), sde)
    g = torch.Generator().manual_seed(0)
    x_T = sde.prior_std() * torch.randn(64, 2, generator=g, dtype=torch.float64)
    got, x0 = straightness(model, x_T.clone(), 2000)
    T = sde.T
    m = lambda t: (1 - t) * mu  # noqa: E731
    s = lambda t: np.sqrt((1 - t) ** 2 * var + t**2)  # noqa: E731
    ds = lambda t: (-(1 - t) * var + t) / s(t)  # noqa: E731
    xT = x_T.numpy()
    z = (xT - m(T)) / s(T)
    end = m(0.0) + s(0.0) * z
    torch.testing.assert_close(x0, torch.from_numpy(end), rtol=0, atol=2e-3)  # the Euler path ends where the flow does
    nodes, weights = np.polynomial.legendre.leggauss(200)
    t = (nodes + 1) / 2 * T
    xdot = -mu[None, None, :] + ds(t[:, None, None]) * z[None]  # dx/dt, [node, sample, dim]
    integrand = ((T * xdot + (end - xT)[None]) ** 2).mean(-1)  # || dZ/du - (Z_1 - Z_0) ||^2 per element, dZ/du = -T dx/dt
    want = (weights[:, None] * integrand).sum(0) / 2  # (1/T) int_0^T dt = 1/2 sum w over the mapped nodes
    np.testing.assert_allclose(got.numpy(), want, rtol=5e-3)
    assert want.mean() > 1e-3  # a curved flow: the measure has something to find


class _CouplingVelocity(torch.nn.Module):
    """The exact velocity field of the straight paths of the coupling x1 = a * z (a per element):
    at x_t = (1 - t) a z + t z, z = x_t / ((1 - t) a + t) and u = z - x1 = (1 - a) z."""

    def __init__(self, sde, a):
        super().__init__()
        self.sde, self.a = sde, a

    def forward(self, x, t, cond=None):
        tt = broadcast(t, x)
        z = x / ((1 - tt) * self.a + tt)
        u = (1 - self.a) * z
        sde = self.sde
        x0, eps = split_velocity(u, x, *(broadcast(f(t), x) for f in (sde.alpha, sde.sigma, sde.alpha_dot, sde.sigma_dot)))
        return Prediction(x0=x0, eps=eps, sigma=broadcast(sde.sigma(t), x))


def test_reflow_loss_vanishes_at_the_velocity_of_its_pairs_coupling():
    """objective=reflow regresses the velocity of the pairs' own coupling: the exact field of x1 = a z has
    zero loss on those pairs, but not as flow matching with fresh noise, nor on the pairs shuffled."""
    sde = LinearSDE()
    g = torch.Generator().manual_seed(1)
    a = torch.tensor([0.3, 2.0, 0.6], dtype=torch.float64)  # > 0: x_t determines z at every t
    z = torch.randn(512, 3, generator=g, dtype=torch.float64)
    x1 = a * z
    model = _CouplingVelocity(sde, a)
    rng = lambda: BatchRandom(0, 0, 0, 0, 1, 512, "cpu")  # noqa: E731
    reflow = ReflowObjective(sde, pairs="unused.npz")
    assert float(reflow.loss(model, x1, None, rng(), batch={NOISE: z})) < 1e-20
    assert float(FlowObjective(sde).loss(model, x1, None, rng())) > 0.1
    assert float(reflow.loss(model, x1, None, rng(), batch={NOISE: z.flip(0)})) > 0.1
    with pytest.raises(RuntimeError, match="objective.pairs"):
        reflow.loss(model, x1, None, rng())


# --------------------------------------------------------------------------- the command
TRAIN = ["trainer=cpu", "logger=none", "progress_bar=false", "sample_grid.every_n_steps=0", "trainer.enable_model_summary=false",
         "optim.warmup_steps=0", "data.batch_size=16"]  # fmt: skip


def _list(items) -> str:
    return "[" + ",".join(f"'{o}'" for o in items) + "]"


@pytest.fixture(scope="module")
def reflowed(tmp_path_factory):
    root = tmp_path_factory.mktemp("reflow")
    flow = root / "flow"
    run_train(flow, [*tiny_overrides("unet"), "sde=linear", "objective=flow", "trainer.max_steps=4"])
    run = root / "run"
    metrics = ["metrics.names=[fid]", "metrics.detector=edm", f"metrics.detector_path={edm_detector()}", "metrics.download=false",
               "metrics.fid_min_samples=16", "metrics.ref_limit=32", "metrics.progress_bar=false", f"metrics.cache_dir={root / 'cache'}"]  # fmt: skip
    out = run_cli(["reflow", f"ckpt={flow}", "num_pairs=48", "steps=3", "batch_size=32", "train_steps=3", f"train_overrides={_list(TRAIN)}",
                   "eval.num_samples=16", "eval.steps=[1,2]", "eval.straightness_samples=16", "eval.straightness_steps=4",
                   f"eval.sample_overrides={_list(metrics)}", "progress_bar=false", f"hydra.run.dir={run}"], root)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return flow, run, out


def test_pairs_are_the_models_ode_ends_of_their_noise(reflowed):
    """pairs.npz: noise i is draw 0 of (seed, i), and sample i the configured ODE's end from it, the very
    sample `diffctl sample` makes (here in this process, another batch size)."""
    from diffctl.noise import sample_noise
    from diffctl.samplers import generate
    from diffctl.source import load_source
    from omegaconf import OmegaConf

    flow, run, _ = reflowed
    pairs = np.load(run / "pairs.npz")
    assert pairs["noise"].shape == pairs["samples"].shape == (48, 1, 8, 8) and "labels" not in pairs
    source = load_source(OmegaConf.create({"use_ema": True}), str(flow / "checkpoints" / "last.ckpt"))
    from diffctl.denoiser import ClippedModel

    model = ClippedModel(source.denoiser, -1.0, 1.0)  # clip_denoised=null: clipped, as `diffctl sample` for images
    want_noise = sample_noise(0, range(10, 30)).randn((1, 8, 8))
    np.testing.assert_array_equal(pairs["noise"][10:30], want_noise.numpy())
    want = generate(model, 20, (1, 8, 8), {"name": "ode"}, 3, 0, None, "cpu", 10)
    np.testing.assert_allclose(pairs["samples"][10:30], want.numpy(), rtol=0, atol=1e-5)


def test_reflow_trains_on_the_pairs_from_the_models_weights_and_reports(reflowed):
    flow, run, out = reflowed
    ckpt = load_ckpt(run / "train" / "checkpoints" / "last.ckpt")
    cfg = ckpt["hyper_parameters"]["config"]
    assert ckpt["global_step"] == 3 and cfg["objective"]["_target_"] == "diffctl.objectives.ReflowObjective"
    assert cfg["objective"]["pairs"] == str(run / "pairs.npz") and cfg["sde"]["_target_"] == "diffctl.sde.LinearSDE"
    assert not any(k.startswith("teacher.") for k in ckpt["state_dict"])  # the teacher gave its weights only
    teacher = {k[4:]: v for k, v in load_ckpt(flow / "checkpoints" / "last.ckpt")["state_dict"].items() if k.startswith("ema.")}
    raw = {k[9:]: v for k, v in ckpt["state_dict"].items() if k.startswith("denoiser.")}
    assert sum(torch.allclose(raw[k], teacher[k], atol=1e-2) for k in teacher) == len(teacher)  # 3 Adam steps from the teacher
    results = json.loads((run / "reflow.json").read_text())["results"]
    for who in ("teacher", "reflow"):
        assert results[who]["straightness"] > 0 and all(results[who][f"fid_{k}"] > 0 for k in (1, 2))
        for k in (1, 2):
            metrics = json.loads((run / "eval" / f"{who}_{k}" / "metrics.json").read_text())
            assert metrics["steps"] == k and metrics["seed"] == 1 and metrics["fid"] == results[who][f"fid_{k}"]
    assert "diffctl reflow: done" in out.stdout and "after reflow" in out.stdout


@pytest.mark.parametrize("overrides, message", [
    ([], "ckpt must name the flow model"),
    (["ckpt=FLOW", "sampler=ddpm"], "sampler=ddpm with these options is stochastic"),
    (["ckpt=FLOW", "eval.seed=0"], "eval.seed=0 is the pairs' seed"),
    (["resume=TMP"], "not a `diffctl reflow` run directory (no reflow.json)"),
])
def test_bad_plans_are_refused_before_any_work(reflowed, tmp_path, overrides, message):
    flow, _, _ = reflowed
    args = [o.replace("FLOW", str(flow)).replace("TMP", str(tmp_path)) for o in overrides]
    out = run_cli(["reflow", *args, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert out.returncode != 0 and message in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not (tmp_path / "run" / "pairs.npz").exists()


def test_train_objective_reflow_refuses_missing_or_mismatched_pairs(reflowed, tmp_path):
    flow, run, _ = reflowed
    base = ["train", *tiny_overrides("unet"), "objective=reflow", f"objective.teacher={flow}"]
    out = run_cli([*base, f"hydra.run.dir={tmp_path / 'a'}"], tmp_path)
    assert out.returncode != 0 and "set objective.pairs" in out.stderr and "Traceback" not in out.stderr
    bad = tmp_path / "bad.npz"
    np.savez(bad, noise=np.zeros((4, 1, 4, 4), np.float32), samples=np.zeros((4, 1, 4, 4), np.float32))
    out = run_cli([*base, f"objective.pairs={bad}", f"hydra.run.dir={tmp_path / 'b'}"], tmp_path)
    assert out.returncode != 0 and "objective.pairs holds 1x4x4 pairs; this model makes 1x8x8" in out.stderr
    out = run_cli([*base, f"objective.pairs={run / 'pairs.npz'}", "data.random_flip=true", f"hydra.run.dir={tmp_path / 'c'}"], tmp_path)
    assert out.returncode != 0 and "data.random_flip=false" in out.stderr


def test_resume_keeps_finished_stages_and_redoes_only_what_is_missing(reflowed, tmp_path):
    """A run that stopped during its evaluation: `resume=` keeps the pairs, the training and the finished
    evaluations (files untouched) and remakes the missing one, with the same FID and straightness."""
    import shutil

    _, run, _ = reflowed
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    plan = json.loads((copy / "reflow.json").read_text())
    want = plan["results"]["reflow"]
    del plan["results"]["reflow"]
    (copy / "reflow.json").write_text(json.dumps(plan))
    shutil.rmtree(copy / "eval" / "reflow_2")
    kept = [copy / "pairs.npz", copy / "train" / "checkpoints" / "last.ckpt", copy / "eval" / "teacher_1" / "metrics.json",
            copy / "eval" / "reflow_1" / "metrics.json"]  # fmt: skip
    before = [p.stat().st_mtime_ns for p in kept]
    out = run_cli(["reflow", f"resume={copy}", "progress_bar=false"], tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert [p.stat().st_mtime_ns for p in kept] == before
    assert "pairs: done" in out.stdout and "eval: " in out.stdout and "1 step\n" not in out.stdout
    got = json.loads((copy / "reflow.json").read_text())["results"]["reflow"]
    assert got["fid_2"] == pytest.approx(want["fid_2"], rel=1e-6) and got["straightness"] == pytest.approx(want["straightness"], rel=1e-6)
    assert (copy / "eval" / "reflow_2" / "metrics.json").is_file()


def test_pairs_on_two_processes_equal_those_of_one(reflowed, tmp_path):
    """The pairs job on 2 gloo processes, another batch size: the same noise bitwise and the same samples
    (to float rounding) as the one-process run of the fixture."""
    from diffctl.config import compose_config
    from diffctl.reflow import make_pairs, make_plan

    flow, run, _ = reflowed
    cfg = compose_config("reflow", [f"ckpt={flow}", "num_pairs=48", "steps=3", "batch_size=7", "trainer.accelerator=cpu",
                                    "trainer.devices=2", "progress_bar=false"], tmp_path)  # fmt: skip
    make_pairs(make_plan(cfg), tmp_path, cfg)
    one, two = np.load(run / "pairs.npz"), np.load(tmp_path / "pairs.npz")
    np.testing.assert_array_equal(two["noise"], one["noise"])
    np.testing.assert_allclose(two["samples"], one["samples"], rtol=0, atol=1e-5)
