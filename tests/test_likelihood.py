"""PF-ODE likelihoods (diffctl/likelihood.py) against exact answers: the Gaussian-mixture density, the
unbiasedness of Hutchinson's estimator, bits/dim of a uniform density, and `diffctl likelihood`."""

import json
import math

import pytest
import torch
from helpers import compose_train, run_cli, tiny_overrides

from diffctl.denoiser import Prediction
from diffctl.errors import ConfigError
from diffctl.likelihood import likelihood
from diffctl.ode_likelihood import bits_per_dim, dequantize, divergence, log_likelihood
from diffctl.networks.gmm import GaussianMixture, MixtureModel
from diffctl.noise import sample_generators
from diffctl.sde import LinearSDE, VESDE, SubVPSDE, VPSDE, broadcast

SDES = {"vp": VPSDE, "vpsub": SubVPSDE, "ve": lambda: VESDE(sigma_max=100.0), "linear": LinearSDE}


def _mixture(dim: int) -> GaussianMixture:
    """K=3 components of different widths and weights; for d=4 one has a full covariance."""
    g = torch.Generator().manual_seed(1)
    means = torch.randn(3, dim, generator=g, dtype=torch.float64)
    if dim == 2:
        return GaussianMixture(means, scales=[0.3, 0.5, 0.1], weights=[0.5, 0.3, 0.2])
    a = torch.randn(3, dim, dim, generator=g, dtype=torch.float64) * 0.25
    cov = a @ a.transpose(1, 2) + 0.04 * torch.eye(dim, dtype=torch.float64)
    return GaussianMixture(means, covariances=cov, weights=[0.5, 0.3, 0.2])


def _at(sde, t: float):
    t = torch.tensor(t, dtype=torch.float64)
    return sde.alpha(t), sde.sigma(t)


@pytest.mark.parametrize("dim", [2, 4])
@pytest.mark.parametrize("sde_name", ["vp", "vpsub", "ve", "linear"])
def test_exact_trace_matches_the_mixture_density(sde_name, dim):
    sde, mixture = SDES[sde_name](), _mixture(dim)
    x = torch.cat([mixture.sample(12, torch.Generator().manual_seed(2))[0], mixture.means])  # samples and the modes
    res = log_likelihood(MixtureModel(mixture, sde), x, trace="exact", rtol=1e-6, atol=1e-6)
    # The ODE starts at t = eps: it transports the prior to the density of x_eps = alpha(eps) x0 + sigma(eps) z,
    # not to the data density at t = 0 (the score is singular there). For VE, sigma(eps) = sigma_min = 0.01: at the
    # mean of the 0.1-wide component (d=2) log p_eps is below log p_0 by 0.5 log(1 + 0.01^2/0.1^2) = 5e-3 nats/dim,
    # 50 times what the tight check below allows, so the comparison must be (and is) with the density at t = eps.
    # (For VP/sub-VP, sigma(eps) = 1e-3 and the two differ by < 1e-4.)
    exact = mixture.log_prob(x, *_at(sde, sde.eps))
    # 1. The estimator as users get it, with the N(0, prior_std^2) prior for p_T: within 0.01 nats/dim
    #    (the prior is not exactly p_T: alpha(T) = 6.6e-3 for VP, 5e-3 for linear, sigma_max = 100 for VE, ~3e-3 nats/dim).
    assert ((res.logp - exact) / dim).abs().max() < 0.01
    # 2. The transport alone: with the exact p_T at the ODE's end point in place of the prior, the ODE's error
    #    is the solver's (1e-6 tolerance), far below the t=0 / t=eps difference above.
    transported = res.logp - res.prior_logp + mixture.log_prob(res.z, *_at(sde, sde.T))
    assert ((transported - exact) / dim).abs().max() < 1e-4
    assert res.nfe > 10


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased(probe):
    """Each of 3 points repeated 300 times, each copy with its own probe (its own generator): the mean of the
    estimates is within 3 standard errors (their spread / sqrt(300)) of the exact-trace value."""
    sde, mixture, reps = VESDE(sigma_max=100.0), _mixture(4), 300
    denoiser = MixtureModel(mixture, sde)
    x, _ = mixture.sample(3, torch.Generator().manual_seed(3))
    exact = log_likelihood(denoiser, x, trace="exact", rtol=1e-6, atol=1e-6).logp
    copies = x.repeat_interleave(reps, 0)
    gens = sample_generators(7, range(len(copies)))
    est = log_likelihood(denoiser, copies, trace="hutchinson", probe=probe, generators=gens, rtol=1e-6, atol=1e-6).logp
    est = est.reshape(3, reps)
    se = est.std(1) / math.sqrt(reps)
    assert (se > 0).all()  # the probes do differ
    assert ((est.mean(1) - exact).abs() < 3 * se).all(), ((est.mean(1) - exact) / se).tolist()


def test_hutchinson_estimate_of_a_sample_does_not_depend_on_its_batch():
    sde, mixture = VPSDE(), _mixture(4)
    denoiser = MixtureModel(mixture, sde)
    x, _ = mixture.sample(4, torch.Generator().manual_seed(4))
    kw = dict(trace="hutchinson", probe="rademacher", rtol=1e-6, atol=1e-6)
    batch = log_likelihood(denoiser, x, generators=sample_generators(0, range(4)), **kw).logp
    alone = log_likelihood(denoiser, x[2:3], generators=sample_generators(0, [2]), **kw).logp
    other = log_likelihood(denoiser, x[2:3], generators=sample_generators(0, [3]), **kw).logp
    assert abs(float(batch[2] - alone[0])) < 1e-3  # same probe: equal up to the solver tolerance
    assert abs(float(batch[2] - other[0])) > 1e-2  # another probe gives another estimate


def test_exact_divergence_of_a_network_is_the_jacobian_trace(tmp_path):
    """On a real U-Net (batch of 2, per-sample gradients from the batch sum) against autograd's Jacobian."""
    from diffctl.build import build_denoiser, build_objective, build_sde

    cfg = compose_train(tmp_path, tiny_overrides("unet"))
    sde = build_sde(cfg)
    net = build_denoiser(cfg, sde, build_objective(cfg, sde), {"channels": 1, "resolution": 8, "num_classes": 0}).eval()
    torch.manual_seed(0)
    y = torch.randn(2, 1, 8, 8, requires_grad=True)
    t = torch.full((2,), 0.3)
    div = divergence(net(y, t).eps, y, None)
    for i in range(2):
        jac = torch.autograd.functional.jacobian(lambda z: net(z[None], t[:1]).eps[0], y[i].detach())
        assert torch.allclose(div[i], jac.reshape(64, 64).trace(), rtol=1e-4, atol=1e-4)


class UniformDenoiser(torch.nn.Module):
    """Exact denoiser of data uniform on [-1, 1]^D. In y = x/alpha, s = sigma/alpha each coordinate has
    density q_s(y) = [Phi((1 - y)/s) - Phi((-1 - y)/s)] / 2 (even in y, computed at |y| in log space),
    d/dy log q_s = sign(y) (phi(a) - phi(b)) / (s Z) with a = (-1 - |y|)/s, b = (1 - |y|)/s, and eps = -s d/dy log q_s."""

    def __init__(self, sde):
        super().__init__()
        self.sde = sde

    def forward(self, x, t, labels=None):
        t = torch.as_tensor(t, dtype=torch.float64).expand(x.shape[0])
        alpha, sigma = broadcast(self.sde.alpha(t), x), broadcast(self.sde.sigma(t), x)
        s, y = sigma / alpha, x.double() / alpha
        a, b = (-1 - y.abs()) / s, (1 - y.abs()) / s
        la, lb = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
        log_z = lb + torch.log(-torch.expm1(la - lb))
        log_phi = lambda v: -0.5 * v * v - 0.5 * math.log(2 * math.pi)  # noqa: E731
        grad = torch.sign(y) * (torch.exp(log_phi(a) - log_z) - torch.exp(log_phi(b) - log_z)) / s
        eps = -s * grad
        return Prediction(x0=(y - s * eps).to(x.dtype), eps=eps.to(x.dtype), sigma=sigma.to(x.dtype))


def test_uniform_density_on_the_cube_is_8_bits_per_dim():
    """Closed form: a density uniform on [-1, 1]^D puts probability 256^-D on each 8-bit pixel vector
    (bins of width 1/128), i.e. exactly 8 bits/dim; the ODE's density (2^-D) with the +log2(128) offset
    must give that, for uniformly dequantized 8-bit data."""
    dim = 3
    k = torch.randint(20, 236, (6, dim), generator=torch.Generator().manual_seed(0)).double()  # away from the faces
    x = dequantize(k / 127.5 - 1, sample_generators(0, range(6)))
    res = log_likelihood(UniformDenoiser(VPSDE()), x, trace="exact", rtol=1e-6, atol=1e-6)
    assert torch.allclose(res.logp, torch.full((6,), -dim * math.log(2.0), dtype=torch.float64), atol=5e-3)
    assert torch.allclose(bits_per_dim(res.logp, dim), torch.full((6,), 8.0, dtype=torch.float64), atol=5e-3)
    assert float(bits_per_dim(torch.tensor(-dim * math.log(2.0)), dim)) == pytest.approx(8.0, abs=1e-12)


def test_dequantization_fills_each_pixels_bin():
    k = torch.arange(256, dtype=torch.float64).repeat(200, 1)  # 200 draws of every level
    x = dequantize(k / 127.5 - 1, sample_generators(1, range(200)))
    assert ((x >= k / 128 - 1) & (x < (k + 1) / 128 - 1)).all()  # bin k = [k/128 - 1, (k+1)/128 - 1)
    assert torch.allclose(x.mean(0), (k[0] + 0.5) / 128 - 1, atol=3 * (1 / 128) / math.sqrt(12 * 200))
    with pytest.raises(ValueError, match="8-bit"):
        dequantize(torch.tensor([[0.001]]), sample_generators(0, [0]))


# ---------------------------------------------------------------- the command


def _run(out_dir, overrides):
    return likelihood(compose_train(out_dir, ["progress_bar=false", *overrides], config_name="likelihood"))


def test_cli_on_the_newest_checkpoint_writes_bits_per_dim(trained, tmp_path):
    root, run_dir = trained
    out = tmp_path / "out"
    args = ["likelihood", "num_batches=2", "batch_size=3", "rtol=1e-3", "atol=1e-3", f"hydra.run.dir={out}", "progress_bar=false"]
    result = run_cli(args, root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Using the newest checkpoint" in result.stdout and "bits_per_dim" in result.stdout
    data = json.loads((out / "likelihood.json").read_text())
    assert str(run_dir) in data["checkpoint"] and data["data"] == "digits:test" and data["dim"] == 64
    assert (data["num_samples"], data["trace"], data["probe"], data["dequantize"]) == (6, "hutchinson", "rademacher", True)
    assert data["nfe_per_batch"] > 5 and 7 < data["bits_per_dim"] < 40 and data["bits_per_dim_se"] > 0
    assert "(k + u)/128 - 1" in data["conventions"] and "log2(128)" in data["conventions"] and "t=eps" in data["conventions"]


def test_exact_trace_raw_pixels_and_no_overwrite(trained, tmp_path):
    _, run_dir = trained
    common = [f"ckpt={run_dir}", "num_batches=1", "batch_size=2", "rtol=1e-3", "atol=1e-3", "dequantize=false"]
    exact = _run(tmp_path / "a", [*common, "trace=exact"])
    assert exact["probe"] is None and "no dequantization" in exact["conventions"]
    before = (tmp_path / "a" / "likelihood.json").read_text()
    with pytest.raises(ConfigError, match=r"already holds a run \(likelihood.json\)"):
        _run(tmp_path / "a", common)
    assert (tmp_path / "a" / "likelihood.json").read_text() == before
    # The weak 2-step network barely moves y, so every sample's Hutchinson estimate is close to the exact one.
    hutch = _run(tmp_path / "b", common)
    assert hutch["bits_per_dim"] == pytest.approx(exact["bits_per_dim"], abs=0.05)


def test_cli_gmm_reports_the_exact_density_next_to_the_estimate(tmp_path):
    out = tmp_path / "out"
    args = ["likelihood", "model=gmm", "sde=ve", "trace=exact", "num_batches=2", "batch_size=16", f"hydra.run.dir={out}"]
    result = run_cli(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((out / "likelihood.json").read_text())
    assert data["num_samples"] == 32 and data["weights"] == "exact" and data["sde"] == "ve" and data["dim"] == 2
    assert abs(data["error_nats_per_dim"]) < 3 * data["error_nats_per_dim_se"] + 2e-3
    assert data["max_abs_error_nats_per_dim"] < 0.01
    assert data["nats_per_dim"] == pytest.approx(data["exact_nats_per_dim"], abs=0.01)
    assert "exact_nats_per_dim" in result.stdout and "nats/dim" in data["conventions"]


@pytest.mark.parametrize(
    "args,message",
    [
        (["probe=sphere"], "probe must be one of"),
        (["num_batches=0"], "num_batches must be an integer >= 1"),
        (["rtol=0"], "rtol must be > 0"),
        (["split=valid"], "split must be one of"),
        (["model=unet"], "model= only selects the analytic model=gmm"),
        (["sde=ve"], "sde= applies to model=gmm only"),
        (["model=gmm", "ckpt=x.ckpt"], "needs no checkpoint"),
        (["model=gmm", "model.shape=[3,32,32]", "trace=exact"], "use trace=hutchinson"),
        (["model=gmm", "num_batches=null"], "set num_batches"),
    ],
)
def test_bad_options_raise_before_any_work(tmp_path, args, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _run(tmp_path, args)
    assert not (tmp_path / "likelihood.json").exists()


def test_bad_option_is_one_line_error_from_the_cli(tmp_path):
    result = run_cli(["likelihood", "model=gmm", "trace=diagonal", f"hydra.run.dir={tmp_path / 'out'}"], tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "trace must be one of exact, hutchinson" in result.stderr and len(result.stderr.strip().splitlines()) == 1
