"""Issue 16: samplers register themselves with their option schema (diffctl/samplers/registry.py).

A new sampler is one file in diffctl/samplers/ plus conf/sampler/<name>.yaml: the toy sampler below,
written to a temporary directory on the package's path, becomes selectable by `diffctl sample`, with
its options and the rules between them checked, and nothing else edited. The shipped YAMLs must
state exactly the registered options and defaults, since the CLI's torch-free first check trusts
them (diffctl/cli.py)."""

from __future__ import annotations

import math
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import run_sample
from omegaconf import OmegaConf

import diffctl.samplers
from diffctl.config import compose_config
from diffctl.denoiser import Capabilities, Prediction
from diffctl.errors import ConfigError
from diffctl.noise import sample_noise
from diffctl.samplers import SAMPLERS, check_fits, check_sampler, generate, register_sampler
from diffctl.samplers.registry import discover
from diffctl.schema import Float, validate
from diffctl.sde import VESDE

CONF = Path(__file__).resolve().parents[1] / "conf" / "sampler"


def _yaml_options(path: Path) -> tuple[str, dict]:
    data = OmegaConf.to_container(OmegaConf.load(path))
    return data.pop("name"), data


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_each_conf_sampler_yaml_states_the_registered_options_and_defaults(path):
    name, options = _yaml_options(path)
    assert name == path.stem
    assert options == SAMPLERS[name].defaults  # same keys, same values (1.0e-5 == 1e-5), same order not needed
    check_sampler({"name": name, **options})


def test_every_registered_sampler_has_its_yaml():
    assert sorted(p.stem for p in CONF.glob("*.yaml")) == sorted(SAMPLERS) == ["consistency", "ddim", "ddpm", "dpmpp_2m_sde", "dpmpp_3m_sde", "edm", "euler_ancestral", "ode", "pc"]


def _never(model, x, steps, cond=None, noise=None, *, a: float = 1.0):
    raise AssertionError("not called")


@pytest.mark.parametrize(
    "fn, rules, kw, message",
    [
        (_never, {}, {}, r"options .*\('a',\) differ from its rules \(\)"),  # an option without a rule
        (_never, {"a": Float(), "b": Float()}, {}, "differ from its rules"),  # a rule without an option
        (lambda model, x, steps, cond=None, noise=None, *, a: x, {"a": Float()}, {}, "differ"),  # no default
        (lambda model, x, steps, noise=None, *, a=1.0: x, {"a": Float()}, {}, "parameters before the options"),
        (lambda model, x, steps, cond=None, noise=None, a=1.0: x, {"a": Float()}, {}, "parameters before the options"),
        (_never, {"a": Float()}, {"needs": "wings"}, "needs='wings' is none of"),
    ],
)
def test_registration_refuses_a_function_that_breaks_the_contract(fn, rules, kw, message):
    with pytest.raises(TypeError, match=message):
        register_sampler("broken", **kw, **rules)(fn)
    assert "broken" not in SAMPLERS


def test_a_name_is_registered_once():
    with pytest.raises(TypeError, match="sampler ddim is registered twice"):
        register_sampler("ddim", a=Float())(_never)
    assert SAMPLERS["ddim"].fn is diffctl.samplers.ddim


def test_check_fits_refuses_a_sampler_the_model_cannot_serve():
    def caps(one_step):
        return Capabilities(conditions=frozenset(), num_classes=0, null_condition=False, one_step=one_step, data_range=None,
                            analytic=False, prediction="consistency" if one_step else "eps")  # fmt: skip

    check_fits("consistency", caps(True))
    check_fits("ddim", caps(False))
    with pytest.raises(ConfigError, match=r"^sampler=consistency needs a consistency model .*predicts 'eps': sample it with sampler=ode$"):
        check_fits("consistency", caps(False))
    for name in ("ddpm", "ddim", "pc", "ode", "edm", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"):
        with pytest.raises(ConfigError, match=rf"^sampler={name} needs a diffusion model.*sample it with sampler=consistency$"):
            check_fits(name, caps(True))


# ---------------------------------------------------------------- a new sampler: one file + its YAML

TOY = '''
"""Euler steps of the probability-flow ODE dy/ds = eps on `steps` levels uniform in t between t_start*T and
t_end*T, then the x0 prediction there."""

import torch

from diffctl.samplers.common import denoise, levels_of, start
from diffctl.samplers.registry import below, register_sampler
from diffctl.schema.rules import Float


@register_sampler("toy", t_start=Float(gt=0, le=1), t_end=Float(gt=0, le=1), checks=(below("t_end", "t_start"),))
def toy(model, x, steps, cond=None, noise=None, *, t_start=1.0, t_end=1e-3):
    sde = model.sde
    levels = levels_of(sde, torch.linspace(t_start * sde.T, t_end * sde.T, steps, dtype=torch.float64))
    y = start(x, sde, levels[0])
    for now, nxt in zip(levels, levels[1:]):
        y = y + (nxt.s - now.s) * denoise(model, y, now, cond).eps
    return denoise(model, y, levels[-1], cond).x0
'''


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy sampler as a new module of diffctl.samplers (a directory added to the package's path,
    found by the same `discover` the package runs on import), and its YAML on Hydra's search path."""
    code, conf = tmp_path / "code", tmp_path / "conf" / "sampler"
    code.mkdir()
    conf.mkdir(parents=True)
    (code / "toy.py").write_text(textwrap.dedent(TOY))
    (conf / "toy.yaml").write_text("name: toy\nt_start: 1.0  # in (0, 1]: the first level, t_start * T\nt_end: 1.0e-3\n")
    monkeypatch.setattr(diffctl.samplers, "__path__", [*diffctl.samplers.__path__, str(code)])
    assert "toy" not in SAMPLERS
    discover("diffctl.samplers", diffctl.samplers.__path__)
    yield [f"hydra.searchpath=[file://{tmp_path / 'conf'}]"]
    SAMPLERS.pop("toy", None)
    sys.modules.pop("diffctl.samplers.toy", None)
    if hasattr(diffctl.samplers, "toy"):
        delattr(diffctl.samplers, "toy")


class ExactGaussian:
    """E[x0 | x_t] for data x0 ~ N(M, C^2 I): M + alpha C^2 / (alpha^2 C^2 + sigma^2) (x_t - alpha M)."""

    M, C = 0.5, 0.3

    def __init__(self, sde):
        self.sde = sde

    def __call__(self, x, t, cond=None):
        a, s = self.sde.alpha(t.double())[:, None], self.sde.sigma(t.double())[:, None]
        x0 = self.M + a * self.C**2 / (a * a * self.C**2 + s * s) * (x.double() - a * self.M)
        return Prediction(x0=x0.to(x.dtype), eps=((x.double() - a * x0) / s).to(x.dtype), sigma=s.to(x.dtype))


def test_a_new_sampler_file_is_selectable_and_its_options_checked(toy, tmp_path):
    name, options = _yaml_options(tmp_path / "conf" / "sampler" / "toy.yaml")
    assert name == "toy" and options == SAMPLERS["toy"].defaults
    assert check_sampler({"name": "toy", "t_end": 0.01}) == ("toy", {"t_end": 0.01})
    for spec, message in [
        ({"name": "toy", "t_start": 2}, r"^sampler.t_start must be in \(0, 1\], got 2$"),
        ({"name": "toy", "eta": 0.5}, "^sampler=toy has no option eta; its options are: t_start, t_end$"),
        ({"name": "toy", "t_start": 0.1, "t_end": 0.2}, "^sampler.t_end must be below sampler.t_start, got 0.2 and 0.1$"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check_sampler(spec)
    # the config schema (diffctl sample's and train's validation) knows it too, with its YAML's defaults
    cfg = compose_config("sample", [*toy, "sampler=toy", "sampler.t_end=0.01"], tmp_path / "run")
    assert dict(cfg.sampler) == {"name": "toy", "t_start": 1.0, "t_end": 0.01}
    validate(cfg, "sample")
    with pytest.raises(ConfigError, match=r"^sampler.t_start must be in \(0, 1\], got 5$"):
        validate(compose_config("sample", [*toy, "sampler=toy", "sampler.t_start=5"], tmp_path / "run"), "sample")
    with pytest.raises(ConfigError, match="^sample_grid.sampler.t_end must be below sample_grid.sampler.t_start, got 1.0 and 1.0$"):
        validate(compose_config("train", ["sample_grid.sampler={name: toy, t_end: 1.0}"], tmp_path / "run"), "train")


def test_the_new_sampler_runs_as_generate_and_diffctl_sample_run_it(toy, tmp_path):
    """On Gaussian data the flow is closed-form in y = x/alpha, s = sigma/alpha: y(s) = M + (y_T - M)
    sqrt((C^2 + s^2) / (C^2 + s_T^2)); the last step returns E[x0 | y] = M + C^2 / (C^2 + s^2) (y - M).
    1600 Euler steps come within 2e-3 of it (400: 4e-3, first order); one step (no flow) is far from it, so the check can fail."""
    sde = VESDE(sigma_max=20.0)
    ratio = lambda t: float(sde.noise_ratio(torch.tensor(t, dtype=torch.float64)))  # noqa: E731
    M, C, s_T, s_end = ExactGaussian.M, ExactGaussian.C, ratio(sde.T), ratio(0.05 * sde.T)
    x = sde.prior_std() * sample_noise(1, range(64), None).randn((2,))  # the start noise generate() draws for seed 1
    y_end = M + (x.double() - M) * math.sqrt((C**2 + s_end**2) / (C**2 + s_T**2))
    expected = M + C**2 / (C**2 + s_end**2) * (y_end - M)
    out = generate(ExactGaussian(sde), 64, (2,), {"name": "toy", "t_end": 0.05}, 1600, seed=1)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-3)
    assert (generate(ExactGaussian(sde), 64, (2,), {"name": "toy", "t_end": 0.05}, 2, seed=1).double() - expected).abs().max() > 0.05
    # the whole command (model=gmm: the analytic mixture, no checkpoint), which also asks check_fits
    run_sample(tmp_path / "run", [*toy, "model=gmm", "sampler=toy", "steps=3", "num_samples=4", "batch_size=4"])
    assert (tmp_path / "run" / "samples.npz").is_file()
