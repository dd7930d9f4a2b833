"""Forward SDEs in continuous time t in [eps, T] (Song et al., 2021; T = 1 but for the linear path).

Each SDE is described by its Gaussian perturbation kernel
    x_t = alpha(t) * x_0 + sigma(t) * z,   z ~ N(0, I)
and by the drift f(x, t) and diffusion g(t) of  dx = f(x, t) dt + g(t) dw.
Everything else (samplers, objectives, likelihoods) is written in terms of these.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor


def broadcast(v: Tensor, x: Tensor) -> Tensor:
    """Reshape a per-sample [B] tensor so it broadcasts against x [B, ...]."""
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


class SDE(ABC):
    """Base class; subclasses define log_alpha, sigma, beta-like rates and the prior."""

    name = "sde"

    # The default last noise level of the samplers (every spacing but trailing, which ends at t = 1/steps;
    # see samplers.common.noise_levels): score_sde and EDM sample VP-type SDEs down to t = 1e-3 (the
    # last level then has sigma/alpha = 0.0105, DDPM's first step 0.0100) although they train down to
    # 1e-5; the steps below 1e-3 cost network evaluations and change the sample by less than a pixel.
    default_sample_eps: float | None = None

    def __init__(self, eps: float = 1e-5, sample_eps: float | None = None, T: float = 1.0):
        if not 0.0 < eps < T:
            raise ValueError(f"sde.eps must be in (0, T) = (0, {T:g}), got {eps}")
        self.eps = float(eps)
        self.T = float(T)
        if sample_eps is None:
            sample_eps = max(self.eps, self.default_sample_eps or self.eps)
        if not self.eps <= sample_eps < self.T:
            raise ValueError(f"sde.sample_eps must be in [eps, T) = [{self.eps}, {self.T:g}), got {sample_eps}")
        self.sample_eps = float(sample_eps)

    # --- marginals -------------------------------------------------------------------
    @abstractmethod
    def alpha(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def sigma(self, t: Tensor) -> Tensor: ...

    def alpha_dot(self, t: Tensor) -> Tensor:
        """d alpha / dt = f(t) alpha(t) for the drift f(t) x. Every SDE here has its closed form;
        this general identity serves one that does not (tests/test_sde.py checks both)."""
        return self.drift(torch.ones_like(t), t) * self.alpha(t)

    def sigma_dot(self, t: Tensor) -> Tensor:
        """d sigma / dt = (g^2/2 + f sigma^2) / sigma, from the marginal variance's ODE
        d sigma^2/dt = 2 f sigma^2 + g^2 (general, like alpha_dot)."""
        sigma = self.sigma(t)
        return (0.5 * self.diffusion(t) ** 2 + self.drift(torch.ones_like(t), t) * sigma * sigma) / sigma

    def marginal(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return broadcast(self.alpha(t), x0) * x0 + broadcast(self.sigma(t), x0) * noise

    def noise_ratio(self, t: Tensor) -> Tensor:
        """sigma/alpha: the noise level of x_t/alpha, which is a VE process (monotone in t)."""
        return self.sigma(t) / self.alpha(t)

    def t_from_noise_ratio(self, ratio: Tensor, iters: int = 64) -> Tensor:
        """Invert noise_ratio by bisection (it is strictly increasing on [eps, T])."""
        ratio = torch.as_tensor(ratio, dtype=torch.float64)
        lo = torch.full_like(ratio, 0.0)
        hi = torch.full_like(ratio, self.T)
        for _ in range(iters):
            mid = (lo + hi) / 2
            below = self.noise_ratio(mid) < ratio
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
        return (lo + hi) / 2

    # --- the SDE itself --------------------------------------------------------------
    @abstractmethod
    def drift(self, x: Tensor, t: Tensor) -> Tensor: ...

    @abstractmethod
    def diffusion(self, t: Tensor) -> Tensor: ...

    # --- prior -----------------------------------------------------------------------
    def prior_std(self) -> float:
        return 1.0

    def prior_sample(self, shape, generator: torch.Generator | None = None, device=None) -> Tensor:
        return torch.randn(shape, generator=generator, device=device) * self.prior_std()

    def prior_logp(self, z: Tensor) -> Tensor:
        """Log-density of the isotropic Gaussian prior, summed over all but the batch dim."""
        s = self.prior_std()
        d = z[0].numel()
        return -0.5 * d * math.log(2 * math.pi * s * s) - z.flatten(1).pow(2).sum(1) / (2 * s * s)

    def __repr__(self) -> str:  # shows up in logs and error messages
        params = ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


class VPSDE(SDE):
    """Variance preserving: dx = -1/2 beta(t) x dt + sqrt(beta(t)) dw, beta linear in t.

    The continuous limit of DDPM's linear schedule: beta_i = beta(t_i)/N with N steps.
    """

    name = "vp"
    default_sample_eps = 1e-3

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, eps: float = 1e-5, sample_eps: float | None = None):
        super().__init__(eps, sample_eps)
        if not 0.0 <= beta_min < beta_max:
            raise ValueError(f"VP SDE needs 0 <= beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def integrated_beta(self, t: Tensor) -> Tensor:
        """int_0^t beta(s) ds."""
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(-0.5 * self.integrated_beta(t))

    def sigma(self, t: Tensor) -> Tensor:
        # -expm1 keeps precision when t is tiny (sigma ~ sqrt(beta_min * t)).
        return torch.sqrt(-torch.expm1(-self.integrated_beta(t)))

    def alpha_dot(self, t: Tensor) -> Tensor:
        return -0.5 * self.beta(t) * self.alpha(t)

    def sigma_dot(self, t: Tensor) -> Tensor:  # sigma^2 = 1 - exp(-B): 2 sigma sigma' = beta exp(-B)
        return 0.5 * self.beta(t) * torch.exp(-self.integrated_beta(t)) / self.sigma(t)

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        return -0.5 * broadcast(self.beta(t), x) * x

    def diffusion(self, t: Tensor) -> Tensor:
        return torch.sqrt(self.beta(t))


class SubVPSDE(VPSDE):
    """sub-VP: same drift as VP, diffusion g^2 = beta(t) (1 - exp(-2 int beta)); its marginal
    std 1 - exp(-int beta) is below VP's, which gave better likelihoods in Song et al."""

    name = "vpsub"

    def sigma(self, t: Tensor) -> Tensor:
        return -torch.expm1(-self.integrated_beta(t))

    def sigma_dot(self, t: Tensor) -> Tensor:  # sigma = 1 - exp(-B)
        return self.beta(t) * torch.exp(-self.integrated_beta(t))

    def diffusion(self, t: Tensor) -> Tensor:
        return torch.sqrt(self.beta(t) * -torch.expm1(-2.0 * self.integrated_beta(t)))


class VESDE(SDE):
    """Variance exploding: dx = sqrt(d sigma^2/dt) dw with sigma(t) geometric in t (SMLD/NCSN).

    The argument defaults are score_sde's CIFAR-10 values for pixels in [0, 1]; conf/sde/ve.yaml
    sets diffctl's, for data in [-1, 1] (sigma_min 0.02, sigma_max from the data config)."""

    name = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, eps: float = 1e-5, sample_eps: float | None = None):
        super().__init__(eps, sample_eps)
        if not 0.0 < sigma_min < sigma_max:
            raise ValueError(f"VE SDE needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def alpha(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def sigma(self, t: Tensor) -> Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def alpha_dot(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def sigma_dot(self, t: Tensor) -> Tensor:
        return self.sigma(t) * math.log(self.sigma_max / self.sigma_min)

    def t_from_noise_ratio(self, ratio: Tensor, iters: int = 64) -> Tensor:
        ratio = torch.as_tensor(ratio, dtype=torch.float64)
        return torch.log(ratio / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        return torch.zeros_like(x)

    def diffusion(self, t: Tensor) -> Tensor:
        return self.sigma(t) * math.sqrt(2.0 * math.log(self.sigma_max / self.sigma_min))

    def prior_std(self) -> float:
        return self.sigma_max


class LinearSDE(SDE):
    """The straight path of flow matching / rectified flow (Lipman et al. 2023, Liu et al. 2023):
    x_t = (1 - t) x0 + t z, alpha = 1 - t, sigma = t, velocity d x_t / dt = z - x0.

    Its SDE is dx = -x/(1 - t) dt + sqrt(2t/(1 - t)) dw. alpha(1) = 0, where x/alpha and sigma/alpha
    (every sampler's variables) are undefined, so the path ends at T = t_max < 1 and the prior stands
    for x_T there, as for VP, whose alpha(1) is 0.0067 (t_max = 0.995: s(T) = 199, VP's 152).
    The papers start from pure noise N(0, I) at t = 1 exactly; here the prior is N(0, (1 - T)^2 + T^2),
    the marginal at T of unit-variance data (see prior_std), and it misses x_T's (1 - T) x0 term."""

    name = "linear"
    default_sample_eps = 1e-3

    def __init__(self, eps: float = 1e-5, sample_eps: float | None = None, t_max: float = 0.995):
        if not 0.0 < t_max < 1.0:
            raise ValueError(f"sde.t_max must be in (0, 1) (alpha(1) = 0), got {t_max}")
        super().__init__(eps, sample_eps, T=t_max)
        self.t_max = float(t_max)

    def alpha(self, t: Tensor) -> Tensor:
        return 1.0 - t

    def sigma(self, t: Tensor) -> Tensor:
        return torch.as_tensor(t) * 1.0  # a new tensor, as the other SDEs return

    def alpha_dot(self, t: Tensor) -> Tensor:
        return -torch.ones_like(t)

    def sigma_dot(self, t: Tensor) -> Tensor:
        return torch.ones_like(t)

    def t_from_noise_ratio(self, ratio: Tensor, iters: int = 64) -> Tensor:
        ratio = torch.as_tensor(ratio, dtype=torch.float64)
        return ratio / (1.0 + ratio)

    def drift(self, x: Tensor, t: Tensor) -> Tensor:
        return -x / broadcast(1.0 - t, x)

    def prior_std(self) -> float:
        """sqrt((1 - T)^2 + T^2) (0.99501 at T = 0.995): the std at T of data with unit variance, as VP's
        1 is (alpha^2 + sigma^2 = 1 there). A plain N(0, 1) would claim data of variance
        (1 - T^2)/(1 - T)^2 = 399 to samplers that start below T (samplers.common.start)."""
        return math.sqrt((1.0 - self.T) ** 2 + self.T**2)

    def diffusion(self, t: Tensor) -> Tensor:
        return torch.sqrt(2.0 * t / (1.0 - t))


def ddpm_betas(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM's discrete linear schedule (float64). Step i corresponds to VP time t=(i+1)/N with
    beta_min = N*beta_start and beta_max = N*beta_end (0.1 and 20 for the defaults), to first order
    in 1/N: VP integrates beta over [0, t] where DDPM sums beta(k/(N-1))/N, and DDPM's log(1 - beta)
    is not -beta. The VP's sigma/alpha is therefore off DDPM's by O(1/N) relative: at the first step
    its sigma^2 is 1 + (beta_max - beta_min)/(2 N beta_min) times DDPM's (sigma/alpha +4.9% at
    N = 1000), at the last sigma/alpha is 3.3% below; both shrink 10x at N = 10000."""
    return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)


def ddpm_alphas_cumprod(betas: Tensor) -> Tensor:
    return torch.cumprod(1.0 - betas, dim=0)
