"""denoiser.prediction: the network's parameterization belongs to the composed model, not the objective.

Trains tiny x0- and v-networks under the ddpm loss and samples them; checks the conversions against
hand-written closed forms (VP's alpha, sigma; a point-mass data distribution, whose exact x0 is the
point); checks that the older objective.prediction and checkpoints that name it still work; and that
impossible combinations stop in one line.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import compose_train, load_ckpt, run_cli, run_sample, run_train, tiny_overrides
from torch import nn

from diffctl.build import build_denoiser, build_objective, build_sde, load_denoiser
from diffctl.denoiser import compose
from diffctl.errors import ConfigError
from diffctl.objectives import DDPMObjective, NCSNObjective
from diffctl.rng import BatchRandom
from diffctl.schema import validate
from diffctl.sde import VPSDE

SHAPE = {"channels": 1, "resolution": 8, "num_classes": 0}
SAMPLE = ["num_samples=4", "batch_size=4", "steps=3", "metrics.names=[]", "sampler=ddim"]


def _model(tmp_path, overrides):
    cfg = compose_train(tmp_path, [*tiny_overrides("unet"), *overrides])
    validate(cfg, "train")
    sde = build_sde(cfg)
    return build_denoiser(cfg, sde, build_objective(cfg, sde), SHAPE)


# ------------------------------------------------------------------- (a) training x0 and v networks


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pred")
    out = {}
    for prediction in ("x0", "v"):
        run_train(root / prediction, [*tiny_overrides("unet"), "trainer.max_steps=2", f"denoiser.prediction={prediction}"])
        out[prediction] = root / prediction
    run_train(root / "old-x0", [*tiny_overrides("unet"), "trainer.max_steps=2", "objective.prediction=x0"])
    out["old-x0"] = root / "old-x0"
    return out


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_ddpm_trains_and_samples_an_x0_or_v_network(runs, prediction, tmp_path):
    run = runs[prediction]
    model, cfg = load_denoiser(run)
    assert model.parameterization.name == prediction and model.capabilities.prediction == prediction
    assert cfg.denoiser.prediction == prediction and cfg.objective.prediction is None  # recorded in the checkpoint
    run_sample(tmp_path / "s", [f"ckpt={run}", *SAMPLE])
    samples = np.load(tmp_path / "s" / "samples.npz")["samples"]
    assert samples.shape[0] == 4 and np.isfinite(samples.astype(np.float64)).all()


def test_the_default_is_the_objectives_own_parameterization(tmp_path):
    assert _model(tmp_path, []).parameterization.name == "eps"
    assert _model(tmp_path, ["objective=ncsn"]).parameterization.name == "score"
    assert _model(tmp_path, ["objective=consistency"]).parameterization.name == "consistency"
    assert _model(tmp_path, ["objective=consistency", "denoiser.prediction=consistency"]).parameterization.name == "consistency"
    for prediction in ("eps", "x0", "v"):  # the score-matching loss trains any parameterization too
        assert _model(tmp_path, ["objective=ncsn", f"denoiser.prediction={prediction}"]).parameterization.name == prediction
    assert _model(tmp_path, ["denoiser.prediction=score"]).parameterization.name == "score"


# ------------------------------------------------------------------- (b) the conversions, by hand


def _vp_alpha_sigma(t: float) -> tuple[float, float]:
    """VP with beta(t) = 0.1 + 19.9 t: alpha = exp(-(0.1 t + 19.9 t^2 / 2) / 2), sigma = sqrt(1 - alpha^2)."""
    alpha = math.exp(-0.5 * (0.1 * t + 0.5 * 19.9 * t * t))
    return alpha, math.sqrt(1.0 - alpha * alpha)


class _Exact(nn.Module):
    """For data that is the single point x_star, E[x0 | x_t] = x_star: outputs exactly what each
    parameterization asks for, written from the closed forms (unscaled input: it sees x_t itself)."""

    def __init__(self, kind: str, x_star: torch.Tensor):
        super().__init__()
        self.kind, self.x_star = kind, x_star

    def forward(self, x, noise_labels, class_labels=None):
        rows = []
        for xi, c in zip(x.double(), noise_labels.tolist()):
            alpha, sigma = _vp_alpha_sigma(c / 1000.0)
            x0 = self.x_star.double()
            eps = (xi - alpha * x0) / sigma
            rows.append({"x0": x0, "eps": eps, "v": alpha * eps - sigma * x0, "score": -eps}[self.kind])
        return torch.stack(rows).to(x.dtype)  # score: the net's output / sigma is the score -eps / sigma


@pytest.mark.parametrize("kind", ["x0", "v", "score"])
def test_an_exact_network_gives_the_exact_eps_under_its_parameterization(kind):
    torch.manual_seed(0)
    x_star = torch.randn(1, 4, 4, dtype=torch.float64)
    noise = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([0.05, 0.4, 0.9], dtype=torch.float64)
    a_s = [_vp_alpha_sigma(float(ti)) for ti in t]
    x_t = torch.stack([a * x_star + s * n for (a, s), n in zip(a_s, noise)])
    model = compose(_Exact(kind, x_star), VPSDE(), kind, scale_input=False)
    pred = model(x_t, t)
    # by hand: eps = (x_t - alpha x0) / sigma, which for x_t = alpha x_star + sigma noise is the noise
    want = torch.stack([(xi - a * x_star) / s for xi, (a, s) in zip(x_t, a_s)])
    torch.testing.assert_close(want, noise, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(pred.eps, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(pred.x0, x_star.expand_as(x_t), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["x0", "v"])
def test_the_ddpm_and_ncsn_losses_vanish_for_an_exact_x0_or_v_network(kind):
    """The losses compare the model's eps (score) with the noise: an exact network of any
    parameterization costs nothing, a wrong one does."""
    x_star = torch.randn(1, 4, 4, dtype=torch.float64)
    data = x_star.expand(32, 1, 4, 4).contiguous()
    model = compose(_Exact(kind, x_star), VPSDE(), kind, scale_input=False)
    wrong = compose(_Exact(kind, x_star), VPSDE(), "eps", scale_input=False)  # its x0 (or v) read as eps
    for objective in (DDPMObjective(VPSDE()), NCSNObjective(VPSDE())):
        assert float(objective.loss(model, data, None, BatchRandom(1, 0, 0, 0, 1, 32, "cpu"))) < 1e-12
        assert float(objective.loss(wrong, data, None, BatchRandom(1, 0, 0, 0, 1, 32, "cpu"))) > 1e-2


# ------------------------------------------------------------------- (c) the older objective.prediction


def test_the_older_objective_prediction_still_chooses_the_network(tmp_path):
    assert _model(tmp_path, ["objective.prediction=x0"]).parameterization.name == "x0"
    assert _model(tmp_path, ["objective.prediction=v", "denoiser.prediction=v"]).parameterization.name == "v"  # agreeing: fine


def test_a_checkpoint_that_names_it_in_objective_prediction_loads_and_samples_the_same(runs, tmp_path):
    """A checkpoint written before denoiser.prediction: its config has objective.prediction=x0 and no
    denoiser.prediction. It loads as an x0 network and samples exactly as the run's own checkpoint."""
    run = runs["old-x0"]
    ckpt = load_ckpt(run / "checkpoints" / "last.ckpt")
    config = ckpt["hyper_parameters"]["config"]
    assert config["objective"]["prediction"] == "x0" and config["denoiser"]["prediction"] == "x0"
    del config["denoiser"]["prediction"]
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    model, _ = load_denoiser(old)
    assert model.parameterization.name == "x0"
    run_sample(tmp_path / "new", [f"ckpt={run}", *SAMPLE])
    run_sample(tmp_path / "old", [f"ckpt={old}", *SAMPLE])
    same = [np.load(tmp_path / d / "samples.npz")["samples"] for d in ("new", "old")]
    np.testing.assert_array_equal(*same)


# ------------------------------------------------------------------- (d) one-line errors

CONFLICT = "error: denoiser.prediction must be null or x0 when objective.prediction=x0 (its older key) is given, got v"
CONSISTENCY = "error: denoiser.prediction must be null or consistency with objective=consistency, got x0"


@pytest.mark.parametrize("overrides,line", [
    (["objective.prediction=x0", "denoiser.prediction=v"], CONFLICT),
    (["objective=consistency", "denoiser.prediction=x0"], CONSISTENCY),
    (["objective=ncsn", "denoiser.prediction=consistency"],
     "error: denoiser.prediction must be null, eps, x0, v, score, flow or edm with objective=ncsn, got consistency"),
])  # fmt: skip
def test_impossible_combinations_are_one_line_errors_before_any_work(overrides, line, tmp_path):
    cfg = compose_train(tmp_path, [*tiny_overrides("unet"), *overrides])
    with pytest.raises(ConfigError) as err:
        validate(cfg, "train")
    assert f"error: {err.value}" == line


@pytest.mark.parametrize("args,line", [
    (["objective.prediction=x0", "denoiser.prediction=v"], CONFLICT),
    (["objective=consistency", "denoiser.prediction=x0"], CONSISTENCY),
], ids=["conflict", "consistency"])  # fmt: skip
def test_the_cli_prints_them_as_one_line_and_exits_1(args, line, tmp_path):
    out = run_cli(["train", *args, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert out.returncode == 1 and out.stderr.strip() == line, (out.returncode, out.stderr[-2000:])
    assert not (tmp_path / "run" / "checkpoints").exists()
