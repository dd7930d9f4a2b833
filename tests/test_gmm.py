"""model=gmm: the analytic mixture against torch.distributions as an independent oracle, its config,
and `diffctl sample model=gmm` end to end."""

import json
import math

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from diffctl.distances import mixture_report, random_directions, sliced_wasserstein
from diffctl.errors import ConfigError
from diffctl.networks.gmm import GaussianMixture, MixtureModel
from diffctl.sde import LinearSDE, SubVPSDE, VESDE, VPSDE
from helpers import run_cli, run_sample

G = torch.Generator().manual_seed(0)
MEANS = torch.randn(3, 4, generator=G, dtype=torch.float64) * 1.5
A = torch.randn(3, 4, 4, generator=G, dtype=torch.float64)
COVS = A @ A.transpose(1, 2) * 0.1 + 0.05 * torch.eye(4, dtype=torch.float64)
WEIGHTS = [0.5, 0.3, 0.2]


def _oracle(alpha, sigma, covs=COVS):
    """The noised mixture built by torch.distributions from the textbook formula."""
    cov = alpha**2 * covs + sigma**2 * torch.eye(4, dtype=torch.float64)
    return MixtureSameFamily(Categorical(torch.tensor(WEIGHTS, dtype=torch.float64)), MultivariateNormal(alpha * MEANS, cov))


@pytest.mark.parametrize("alpha,sigma", [(1.0, 0.0), (0.8, 0.6), (0.05, 1.0), (1.0, 7.0)])
def test_log_prob_matches_torch_distributions(alpha, sigma):
    mix = GaussianMixture(MEANS, covariances=COVS, weights=WEIGHTS)
    x = _oracle(alpha, sigma).sample((64,))
    torch.testing.assert_close(mix.log_prob(x, alpha, sigma), _oracle(alpha, sigma).log_prob(x))


@pytest.mark.parametrize("alpha,sigma", [(0.8, 0.6), (0.05, 1.0), (1.0, 7.0), (0.999, 0.01)])
def test_denoiser_is_tweedie_of_the_oracle_density(alpha, sigma):
    """E[x0 | x] = (x + sigma^2 grad log p(x)) / alpha, with the score by autograd of the oracle density."""
    mix = GaussianMixture(MEANS, covariances=COVS, weights=WEIGHTS)
    x = _oracle(alpha, sigma).sample((64,)).requires_grad_()
    (score,) = torch.autograd.grad(_oracle(alpha, sigma).log_prob(x).sum(), x)
    x0, eps = mix.denoise(x.detach(), alpha, sigma)
    torch.testing.assert_close(x0, (x.detach() + sigma**2 * score) / alpha)
    torch.testing.assert_close(eps, -sigma * score)


def test_diagonal_scales_equal_the_same_full_covariances():
    scales = torch.tensor([[0.2, 0.5, 1.0, 0.3], [0.4, 0.4, 0.4, 0.4], [1.0, 0.1, 0.2, 0.3]], dtype=torch.float64)
    diag = GaussianMixture(MEANS, scales=scales, weights=WEIGHTS)
    full = GaussianMixture(MEANS, covariances=torch.diag_embed(scales**2), weights=WEIGHTS)
    x = torch.randn(32, 4, generator=G, dtype=torch.float64)
    for a, b in zip(diag.denoise(x, 0.7, 0.5), full.denoise(x, 0.7, 0.5)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(diag.log_prob(x), full.log_prob(x))


def test_exact_samples_and_moments():
    mix = GaussianMixture(MEANS, covariances=COVS, weights=WEIGHTS)
    ref = _oracle(1.0, 0.0)
    torch.testing.assert_close(mix.mean(), ref.mean)
    centred = MEANS - ref.mean
    within_plus_between = (torch.tensor(WEIGHTS, dtype=torch.float64)[:, None, None] * (COVS + centred[:, :, None] * centred[:, None, :])).sum(0)
    torch.testing.assert_close(mix.covariance(), within_plus_between)
    x, k = mix.sample(20000, torch.Generator().manual_seed(1))
    counts = torch.bincount(k, minlength=3).double() / len(k)
    assert (counts - torch.tensor(WEIGHTS)).abs().max() < 5 * math.sqrt(0.25 / len(k))
    # each component's samples have its mean and covariance (5 standard errors)
    for j in range(3):
        xj = x[k == j]
        se = (COVS[j].diagonal() / len(xj)).sqrt()
        assert ((xj.mean(0) - MEANS[j]).abs() < 5 * se).all()
        assert (torch.cov(xj.T) - COVS[j]).abs().max() < 5 * float(COVS[j].diagonal().max()) * math.sqrt(2 / len(xj))


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE(sigma_max=30.0), LinearSDE()], ids=["vp", "vpsub", "ve", "linear"])
def test_denoiser_at_time_t_uses_the_sde_marginal(sde):
    mix = GaussianMixture(MEANS, covariances=COVS, weights=WEIGHTS)
    t = torch.tensor([0.01, 0.3, 0.9], dtype=torch.float64)
    x = torch.randn(3, 4, generator=G, dtype=torch.float64)
    pred = MixtureModel(mix, sde)(x, t)
    for i in range(3):
        x0, eps = mix.denoise(x[i : i + 1], float(sde.alpha(t[i])), float(sde.sigma(t[i])))
        torch.testing.assert_close(pred.x0[i : i + 1], x0)
        torch.testing.assert_close(pred.eps[i : i + 1], eps)


def test_labels_select_a_component_and_the_null_class_is_the_mixture():
    mix = GaussianMixture(MEANS, covariances=COVS, weights=WEIGHTS)
    x = torch.randn(4, 4, generator=G, dtype=torch.float64)
    labels = torch.tensor([0, 2, 3, 1])  # 3 = K: the whole mixture
    got = mix.log_prob(x, 0.6, 0.8, labels)
    for i, k in enumerate(labels.tolist()):
        cov = 0.36 * COVS + 0.64 * torch.eye(4, dtype=torch.float64)
        want = _oracle(0.6, 0.8).log_prob(x[i]) if k == 3 else MultivariateNormal(0.6 * MEANS[k], cov[k]).log_prob(x[i]) + math.log(WEIGHTS[k])
        torch.testing.assert_close(got[i], want)


def test_sliced_wasserstein_of_shifted_sets_is_the_shift():
    """Shifting a set by v moves every 1-D projection by <v, d>: SW2 = sqrt(mean_d <v, d>^2) = |v| / sqrt(D)."""
    a = torch.randn(500, 3, generator=G, dtype=torch.float64)
    v = torch.tensor([0.3, -0.4, 1.2], dtype=torch.float64)
    dirs = random_directions(3, 4000, seed=1)
    assert float(sliced_wasserstein(a, a, dirs)) == 0.0
    assert float(sliced_wasserstein(a + v, a, dirs)) == pytest.approx(float(v.norm()) / math.sqrt(3), rel=0.03)


def test_mixture_report_separates_exact_from_wrong_samples():
    mix = GaussianMixture(MEANS, covariances=COVS, weights=WEIGHTS)
    exact = mix.sample(4000, torch.Generator().manual_seed(5))[0]
    good, bad = mixture_report(exact, mix), mixture_report(exact * 1.3, mix)
    assert good["sw2"] < 2 * good["sw2_floor"] and good["weights_tv"] < 0.03 and good["cov_error"] < 0.1
    assert bad["sw2"] > 3 * bad["sw2_floor"] and bad["cov_error"] > 0.5


@pytest.mark.parametrize(
    "cfg,message",
    [
        ({"means": [[0, 0], [1, 1]], "weights": [1.0]}, "weights must be K=2"),
        ({"means": [[0, 0], [1, 1]], "scales": [0.1, 0.2, 0.3]}, "scales must be"),
        ({"means": [[0, 0]], "scales": -1.0}, "must be > 0"),
        ({"means": [[0, 0]], "covariances": [[[1, 0], [0, -1]]]}, "positive definite"),
        ({"means": [[0, 0]], "covariances": [[[1, 2], [0, 1]]]}, "symmetric"),
        ({"shape": [1, 4, 4], "means": [[0, 0]]}, "has 16 elements"),
        ({"num_components": 0}, "num_components"),
        ({"shape": []}, "model.shape must be a list of positive integers"),
        ({"shape": [2, 0]}, "model.shape must be a list of positive integers"),
        ({"file": "/nonexistent/mix.yaml"}, "model.file not found"),
    ],
)
def test_bad_mixture_configs_are_config_errors(cfg, message):
    with pytest.raises(ConfigError, match=message):
        GaussianMixture.from_config({"shape": [2], "num_components": 2, "scales": 0.3, **cfg})


def test_mixture_file_replaces_config_keys(tmp_path):
    path = tmp_path / "mix.json"
    path.write_text(json.dumps({"means": [[-2.0, 0.0], [2.0, 0.0]], "scales": [0.1, 0.5], "weights": [3, 1]}))
    mix = GaussianMixture.from_config({"shape": [2], "num_components": 5, "scales": 0.3, "file": str(path)})
    assert mix.num_components == 2
    torch.testing.assert_close(mix.weights, torch.tensor([0.75, 0.25], dtype=torch.float64))
    torch.testing.assert_close(mix.variances, torch.tensor([[0.01, 0.01], [0.25, 0.25]], dtype=torch.float64))
    (tmp_path / "bad.yaml").write_text("means: [[0, 0]]\ncolour: red\n")
    with pytest.raises(ConfigError, match="unknown keys colour"):
        GaussianMixture.from_config({"file": str(tmp_path / "bad.yaml")})


# ------------------------------------------------------------------------- diffctl sample model=gmm
TWO_MODES = ["model=gmm", "model.means=[[-2.0,0.0],[2.0,0.0]]", "model.scales=0.5", "model.weights=[3,1]"]


def test_sample_model_gmm_writes_raw_float_samples_and_distances(tmp_path):
    result = run_sample(tmp_path, [*TWO_MODES, "sde=vpsub", "sampler=ode", "sampler.solver=dpmpp_2m", "steps=30", "num_samples=3000", "batch_size=1000"])
    samples = np.load(tmp_path / "samples.npz")["samples"]
    assert samples.dtype == np.float32 and samples.shape == (3000, 2)
    assert samples.min() < -3.0 and samples.max() > 3.0  # unbounded data: no [-1, 1] clipping, no uint8
    assert not result["clip_denoised"] and result["weights"] == "exact" and result["checkpoint"] == "model=gmm"
    assert result["sw2"] < 4 * result["sw2_floor"]  # single draws of SW2 vary by ~3x; the mode check below is sharper
    assert abs(float((samples[:, 0] > 0).mean()) - 0.25) < 5 * math.sqrt(0.25 * 0.75 / 3000)
    assert json.loads((tmp_path / "metrics.json").read_text())["sw2"] == result["sw2"]
    assert (tmp_path / "samples.png").stat().st_size > 0


def test_sample_model_gmm_image_shaped_from_a_file(tmp_path):
    (tmp_path / "mix.yaml").write_text("shape: [1, 4, 4]\nnum_components: 2\nmean_scale: 0.5\nscales: 0.2\n")
    result = run_sample(tmp_path / "out", ["model=gmm", f"model.file={tmp_path / 'mix.yaml'}", "sampler=ddpm", "steps=20", "num_samples=8"])
    assert np.load(tmp_path / "out" / "samples.npz")["samples"].shape == (8, 1, 4, 4)
    assert result["nfe_per_sample"] == 20


def test_shape_is_inferred_from_the_means_when_not_given(tmp_path):
    means = [[2.0] * 8, [-2.0] * 8]  # 8-D means in a file, no model.shape anywhere
    (tmp_path / "mix.json").write_text(json.dumps({"means": means, "scales": 0.1}))
    run_sample(tmp_path / "out", ["model=gmm", f"model.file={tmp_path / 'mix.json'}", "sampler=ddpm", "steps=20", "num_samples=8"])
    samples = torch.from_numpy(np.load(tmp_path / "out" / "samples.npz")["samples"]).double()
    assert samples.shape == (8, 8)
    assert torch.cdist(samples, torch.tensor(means, dtype=torch.float64)).min(1).values.max() < 1.0  # each near a mean (std 0.1 per dim)
    image_means = torch.arange(8.0).reshape(2, 1, 2, 2).tolist()  # K x C x H x W means give [C, H, W] samples
    assert GaussianMixture.from_config({"means": image_means}).shape == (1, 2, 2)
    assert GaussianMixture.from_config({"num_components": 1, "covariances": torch.eye(3)[None].tolist()}).shape == (3,)
    with pytest.raises(ConfigError, match="has 2 elements but the means have D=8"):  # a given shape still rules
        GaussianMixture.from_config({"means": means, "shape": [2]})


def test_random_means_keep_the_2d_default(tmp_path):
    from helpers import compose_train

    model = compose_train(tmp_path, ["model=gmm"], config_name="sample").model
    assert model.shape is None
    mix = GaussianMixture.from_config(model)
    assert mix.shape == (2,) and mix.means.shape == (4, 2)


def test_conditional_mixture_samples_its_components(tmp_path):
    run_sample(tmp_path, [*TWO_MODES, "model.conditional=true", "class_label=1", "sampler=ddpm", "steps=40", "num_samples=200"])
    samples = np.load(tmp_path / "samples.npz")["samples"]
    assert abs(samples[:, 0].mean() - 2.0) < 5 * 0.5 / math.sqrt(200)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model=gmm", "ckpt=some.ckpt"], "needs no checkpoint"),
        (["model=gmm", "clip_denoised=true"], "model=gmm data is unbounded"),
        (["model=unet"], "model= only selects the analytic model=gmm"),
        (["sde=ve", "ckpt=some.ckpt"], "sde= applies to model=gmm only"),
        (["model=gmm", "sampler=consistency"], "consistency"),
        (["model=gmm", "guidance=2"], "guidance needs a class-conditional model"),
        (["model=gmm", "model.scales=[0.1,0.2]", "model.num_components=3"], "scales must be"),
    ],
)
def test_bad_gmm_sampling_options_are_config_errors(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        run_sample(tmp_path, overrides)


def test_train_refuses_model_gmm_in_one_line(tmp_path):
    out = run_cli(["train", "model=gmm"], tmp_path)
    assert out.returncode == 1
    assert "nothing to train" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_model_gmm_on_two_processes_gives_the_one_process_samples(tmp_path):
    common = [*TWO_MODES, "sampler=ddpm", "steps=5", "num_samples=7", "trainer.accelerator=cpu"]
    one = run_sample(tmp_path / "one", common)
    two = run_sample(tmp_path / "two", [*common, "trainer.devices=2"])
    assert two["devices"] == 2
    a, b = (np.load(tmp_path / d / "samples.npz")["samples"] for d in ("one", "two"))
    np.testing.assert_array_equal(a, b)
    assert one["sw2"] == two["sw2"]
