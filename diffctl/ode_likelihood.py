"""Log-likelihood under the probability-flow ODE (the library; the command is diffctl/likelihood.py).

Variables. Like the samplers (diffctl/samplers/ode.py), the ODE is integrated in y = x/alpha(t) and
u = log s, s = sigma(t)/alpha(t). There every SDE is the VE process y = x0 + s z whose PF-ODE is
dy/ds = eps(alpha y, t(s)), i.e. dy/du = f(y, u) = s eps(alpha y, t(s)). The instantaneous
change of variables (Chen et al. 2018; Song et al. 2021) gives, for the density q_u of y,

    log q_{u0}(y0) = log q_{u1}(y1) + int_{u0}^{u1} div_y f(y_u, u) du,   u0 = log s(eps), u1 = log s(T),

and x = alpha y at a fixed time changes the log-density by -D log alpha. With the prior standing in
for p_T, the log-density of x at t = eps is (D = elements per sample)

    log p_eps(x) = prior_logp(alpha(T) y1) + D log alpha(T) - D log alpha(eps) + int div_y f du,
    y0 = x / alpha(eps).

This is the density of x_eps = alpha(eps) x0 + sigma(eps) z, where the ODE starts (the score is
singular at t = 0); for VE, sigma(eps) is sigma_min, not 0.

Divergence: `exact` takes D vector-Jacobian products per evaluation; `hutchinson` (FFJORD) takes
one, v^T (df/dy) v with E[v v^T] = I, for one probe v per sample fixed over the whole integration
(Rademacher or Gaussian), drawn from the sample's own generator, so a sample's estimate does not
depend on the other samples of its batch. Gradients of the batch sum give per-sample gradients
because the denoisers treat samples independently (no batch statistics).

Bits/dim of 8-bit images (see `bits_per_dim`, `dequantize`, `CONVENTIONS`): pixel value k in
{0..255} is x = k/127.5 - 1 in the training data; uniform dequantization replaces it by
x~ = (k + u)/128 - 1, u ~ U[0, 1)^D, so the 256 bins of width 1/128 tile [-1, 1). Then
P(k) = int_bin p = 128^-D E_u[p(x~)], and by Jensen -log2 P(k) <= E_u[-log2 p(x~)] + D log2 128, so
bits/dim = -log p(x~) / (D ln 2) + 7 is (in expectation over u) an upper bound on the discrete NLL,
the convention of score_sde (its `offset = 7 - inverse_scaler(-1)` for data centred to [-1, 1]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diffctl.errors import ConfigError
from diffctl.noise import sample_generators
from diffctl.samplers.common import Level, denoise
from diffctl.schema.choices import PROBES, TRACES

EXACT_MAX_DIM = 1024  # trace=exact costs D backward passes per ODE evaluation
DEQUANT_OFFSET_BITS = math.log2(128)  # = 7: bins of width 2/256 = 1/128 in [-1, 1]

CONVENTIONS = {
    "dequantized": (
        "log p(x) in nats from the probability-flow ODE (dopri5, y = x/alpha, u = log(sigma/alpha)) from t=eps to T: "
        "the density at t=eps (x_eps = alpha(eps) x0 + sigma(eps) z), prior N(0, prior_std^2 I) at T; "
        "8-bit pixels k in {0..255} uniformly dequantized to x = (k + u)/128 - 1, u ~ U[0,1)^D (bins of width 1/128 tiling [-1,1)); "
        "bits/dim = -log p(x)/(D ln 2) + log2(128) (= +7): an upper bound, in expectation over u, on the discrete NLL of the "
        "8-bit data (score_sde's convention)"
    ),
    "raw": (
        "log p(x) in nats from the probability-flow ODE (dopri5, y = x/alpha, u = log(sigma/alpha)) from t=eps to T: "
        "the density at t=eps, prior N(0, prior_std^2 I) at T; pixels evaluated as is at x = k/127.5 - 1 (no dequantization); "
        "bits/dim = -log p(x)/(D ln 2) + log2(128) (= +7), not a bound on the discrete NLL: compare only with other "
        "undequantized numbers"
    ),
    "gmm": (
        "continuous data (exact samples of the mixture, no dequantization); NLL in nats/dim = -log p(x)/D; "
        "the ODE value is the density at t=eps (x_eps = alpha(eps) x0 + sigma(eps) z), prior N(0, prior_std^2 I) at T; "
        "exact_nats_per_dim is the mixture's closed-form density at t=eps (what the ODE estimates), "
        "exact_data_nats_per_dim the data density at t=0"
    ),
}


@dataclass
class Likelihood:
    logp: Tensor  # [B] log p_eps(x) in nats per sample (float64)
    prior_logp: Tensor  # [B] prior_logp(x_T) at the end of the ODE
    delta_logp: Tensor  # [B] int div_y f du (+ the alpha log-dets: logp - prior_logp)
    nfe: int  # ODE right-hand-side evaluations (network forward passes) for the batch
    z: Tensor  # [B, ...] x_T = alpha(T) y1, where the prior is evaluated


def check_trace(trace: str, probe: str, dim: int | None = None) -> None:
    if trace not in TRACES:
        raise ConfigError(f"trace must be one of {', '.join(TRACES)}, got {trace!r}")
    if probe not in PROBES:
        raise ConfigError(f"probe must be one of {', '.join(PROBES)}, got {probe!r}")
    if trace == "exact" and dim is not None and dim > EXACT_MAX_DIM:
        raise ConfigError(
            f"trace=exact takes D={dim} backward passes per ODE evaluation (at most {EXACT_MAX_DIM} allowed); use trace=hutchinson"
        )


def probes(generators, shape, kind: str, dtype=torch.float32, device=None) -> Tensor:
    """One Hutchinson probe per sample, drawn from that sample's generator: Rademacher (+-1) or N(0, I)."""
    if kind == "rademacher":
        rows = [torch.randint(0, 2, tuple(shape), generator=g).to(dtype) * 2 - 1 for g in generators]
    elif kind == "gaussian":
        rows = [torch.randn(tuple(shape), generator=g, dtype=dtype) for g in generators]
    else:
        raise ValueError(f"unknown probe {kind!r}; choose one of {', '.join(PROBES)}")
    return torch.stack(rows).to(device)


def divergence(f: Tensor, y: Tensor, v: Tensor | None) -> Tensor:
    """div_y f per sample [B]: exact (v None: one VJP per dimension) or v^T (df/dy) v."""

    def vjp(out: Tensor, retain: bool) -> Tensor:
        (g,) = torch.autograd.grad(out, y, retain_graph=retain, allow_unused=True)
        return torch.zeros_like(y) if g is None else g

    if v is not None:
        return (vjp((f * v).sum(), False) * v).flatten(1).sum(1)
    flat = f.flatten(1)
    dim = flat.shape[1]
    div = torch.zeros(f.shape[0], dtype=f.dtype, device=f.device)
    for i in range(dim):
        div = div + vjp(flat[:, i].sum(), i < dim - 1).flatten(1)[:, i]
    return div


def log_likelihood(
    model,
    x: Tensor,
    cond: dict | None = None,
    *,
    trace: str = "exact",
    probe: str = "rademacher",
    generators: list[torch.Generator] | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> Likelihood:
    """log p_eps(x) in nats per sample under the denoiser's probability-flow ODE (module docstring).

    model: the diffctl.denoiser protocol (`model(x, t, cond) -> Prediction`, `.sde`; a trained
    DiffusionModel, a MixtureModel, a wrapper); x: [B, ...] in the model's dtype; cond: its condition. trace: exact | hutchinson; probe: rademacher | gaussian
    (Hutchinson only), one per sample from generators[i] (default: sample_generators(0, range(B))).
    dopri5 chooses its steps on the whole batch, so a sample's value can change with its batch at the
    rtol/atol level. Runs with gradients on (also when called under torch.inference_mode).
    """
    from torchdiffeq import odeint

    check_trace(trace, probe, x[0].numel())
    sde = model.sde
    batch, dim = x.shape[0], x[0].numel()
    start, end = Level(sde, sde.eps), Level(sde, sde.T)
    calls = [0]
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone()  # an inference tensor cannot take part in autograd
        v = None
        if trace == "hutchinson":
            gens = generators if generators is not None else sample_generators(0, range(batch))
            if len(gens) != batch:
                raise ValueError(f"need one generator per sample: {len(gens)} generators for {batch} samples")
            v = probes(gens, x.shape[1:], probe, x.dtype, x.device)

        def rhs(u: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
            s = math.exp(float(u))
            y = state[0].detach().requires_grad_(True)
            f = s * denoise(model, y, Level.from_ratio(sde, s), cond).eps
            div = divergence(f, y, v)
            calls[0] += 1
            return f.detach(), div.detach().to(state[1].dtype)

        u = torch.tensor([math.log(start.s), math.log(end.s)], dtype=torch.float64).to(x.dtype)
        zero = torch.zeros(batch, dtype=x.dtype, device=x.device)
        # step_t: the last step ends exactly at u1 (torchdiffeq would otherwise step past T and
        # interpolate back, evaluating the network beyond the SDE's time range). first_step: the
        # automatic guess divides by |f(u0)| ~ s(eps), tiny, and overshoots to absurd s.
        options = {"step_t": u[1:], "first_step": float(u[1] - u[0]) * 1e-3}
        ys, divs = odeint(rhs, (x / start.alpha, zero), u.to(x.device), rtol=rtol, atol=atol, method="dopri5", options=options)
    y1, integral = ys[-1].detach(), divs[-1].detach().double()
    z = end.alpha * y1
    prior = sde.prior_logp(z.double())
    delta = integral + dim * (math.log(end.alpha) - math.log(start.alpha))
    return Likelihood(logp=prior + delta, prior_logp=prior, delta_logp=delta, nfe=calls[0], z=z)


def bits_per_dim(logp: Tensor, dim: int, offset: float = DEQUANT_OFFSET_BITS) -> Tensor:
    """-log p / (D ln 2) + offset: bits/dim of 8-bit data in [-1, 1] from a density in nats (offset log2 128)."""
    return -logp / (dim * math.log(2.0)) + offset


def dequantize(x: Tensor, generators: list[torch.Generator]) -> Tensor:
    """8-bit images scaled as k/127.5 - 1 (diffctl.data) -> (k + u)/128 - 1, u ~ U[0,1) per element,
    from each sample's generator. Raises ValueError for values off the 8-bit grid."""
    k = torch.round((x.double() + 1) * 127.5)
    if k.min() < 0 or k.max() > 255 or float(((k / 127.5 - 1) - x.double()).abs().max()) > 1e-4:
        raise ValueError("dequantize expects 8-bit images scaled to [-1, 1] as k/127.5 - 1")
    u = torch.stack([torch.rand(tuple(x.shape[1:]), generator=g, dtype=torch.float64) for g in generators]).to(x.device)
    return ((k + u) / 128 - 1).to(x.dtype)
