#!/usr/bin/env python
"""Which s = sigma/alpha range the ODE's karras/logsnr levels should span, and whether DPM-Solver++(2M)
should take its last step at first order: measured against the exact Gaussian mixture on mixtures
with narrow components (issue 13, item 9).

    python scripts/bench_ode_levels.py --out scripts/results/bench_ode_levels.json

For every mixture, solver, level range and NFE: the endpoint error, RMS per coordinate between the
sampler's x0 and the exact PF-ODE solved from the same start (dopri5, rtol = atol = 1e-10, from the
prior at T down to s = 1e-5, then E[x0 | x]; scripts/bench_samplers.py's reference), on the
continuous VP SDE (beta 0.1..20). A range that ends higher pays the ODE it leaves out; one that
starts below T pays for starting from the prior there (`start` in diffctl/samplers/common.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_samplers import FAMILIES, make_mixture, reference_endpoints  # noqa: E402
from benchlib import environment  # noqa: E402

from diffctl.distances import random_directions, sliced_wasserstein  # noqa: E402
from diffctl.networks.gmm import GaussianMixture, MixtureModel  # noqa: E402
from diffctl.samplers import ode  # noqa: E402
from diffctl.noise import sample_noise  # noqa: E402
from diffctl.sde import VPSDE  # noqa: E402

# (sigma_max, sigma_min) candidates for karras levels in s = sigma/alpha; None = the SDE's own end
# (s(T) = 152, s(sample_eps) = 0.0105 for VP). Other spacings always span the SDE's range.
RANGES = {
    "sde": (None, None),  # [0.0105, 152]: the SDE's own ends (the old default)
    "edm": (80.0, 0.002),  # EDM's
    "0.002-152": (None, 0.002),
    "0.0105-80": (80.0, None),  # the new default
    "0.005-80": (80.0, 0.005),
    "0.001-80": (80.0, 0.001),
    "0.0105-40": (40.0, None),
    "0.0105-20": (20.0, None),
}


def mixtures() -> dict[str, GaussianMixture]:
    """Mixtures with one or more narrow components (std <= 0.05)."""
    return {
        "d8k8 one std 0.04": make_mixture(8, 8, 0, 1.0, narrow_std=0.04),  # bench_samplers.py's default
        "d2 stds 0.03/0.05/0.3": GaussianMixture([[-1.0, 0.5], [1.0, 1.0], [0.3, -1.2]], scales=[0.03, 0.05, 0.3],
                                                 weights=[0.3, 0.3, 0.4]),
        "d3 stds 0.04/0.2/0.5": GaussianMixture([[-2.0, 0.5, 0.0], [1.5, 1.5, -0.5], [1.0, -2.0, 1.0]],
                                                scales=[0.04, 0.2, 0.5], weights=[0.5, 0.3, 0.2]),
    }


def print_table(rows: list[dict], nfe: list[int]) -> None:
    """endpoint error and sw2 per (mixture, solver, spacing, range, lower_order_final), one column per target NFE."""
    for metric in ("endpoint", "sw2"):
        table: dict[tuple, dict[int, float]] = {}
        for r in rows:
            key = (r["mixture"], r["solver"], r["spacing"], r["range"], r["lower_order_final"])
            table.setdefault(key, {})[r["target_nfe"]] = r[metric]
        print(f"\n{metric}")
        print(f"{'mixture':24s} {'solver':8s} {'spacing':8s} {'range':10s} {'lof':5s} " + " ".join(f"{n:>9d}" for n in nfe))
        for (m, solver, spacing, rng, lof), by in table.items():
            print(f"{m:24s} {solver:8s} {spacing:8s} {rng:10s} {str(lof):5s} " + " ".join(f"{by[n]:9.2e}" if n in by else " " * 9 for n in nfe))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=1000, help="start noises (and exact samples for sw2) per mixture")
    p.add_argument("--nfe", type=lambda s: [int(v) for v in s.split(",")], default=[5, 9, 10, 20, 50])
    p.add_argument("--solvers", type=lambda s: s.split(","), default=["euler", "heun", "rk4", "dpmpp_2m"])
    p.add_argument("--spacings", type=lambda s: s.split(","), default=["karras", "logsnr", "uniform"])
    p.add_argument("--ranges", type=lambda s: s.split(","), default=list(RANGES), help=f"from {', '.join(RANGES)}")
    p.add_argument("--lof", type=lambda s: [v == "true" for v in s.split(",")], default=[True, False],
                   help="dpmpp_2m lower_order_final values (default true,false)")
    p.add_argument("--out", type=Path, required=True, help="JSON report (must not exist)")
    args = p.parse_args(argv)
    if args.out.exists():
        p.error(f"{args.out} exists; results are never overwritten")
    t0 = time.perf_counter()
    sde = VPSDE()
    T = torch.tensor(sde.T, dtype=torch.float64)
    s_T, alpha_T = float(sde.noise_ratio(T)), float(sde.alpha(T))
    rows, floors = [], {}
    for mname, mixture in mixtures().items():
        dim = mixture.dim
        z = sample_noise(0, range(args.num), version=1).randn((dim,), torch.float64)  # the start noise its results were measured with
        ref = reference_endpoints(mixture, [(s_T, z / alpha_T)])[0]
        g = torch.Generator().manual_seed(1)
        exact = mixture.sample(args.num, g)[0]
        dirs = random_directions(dim, 256, 0)
        floor = float(sliced_wasserstein(mixture.sample(args.num, g)[0], exact, dirs))
        floors[mname] = floor
        den = MixtureModel(mixture, sde)
        for solver in args.solvers:
            for spacing in args.spacings:
                ranges = {k: RANGES[k] for k in (args.ranges if spacing == "karras" else ["sde"])}
                lofs = args.lof if solver == "dpmpp_2m" else (None,)
                for rname, (s_max, s_min) in ranges.items():
                    for lof in lofs:
                        for target in args.nfe:
                            steps = FAMILIES[solver]["steps"](target)
                            opts = {"solver": solver, "spacing": spacing, "sigma_max": s_max, "sigma_min": s_min}
                            if lof is not None:
                                opts["lower_order_final"] = lof
                            x = ode(den, z, steps, **opts)
                            err = float((x - ref).pow(2).mean().sqrt())
                            med = float((x - ref).norm(dim=1).median())
                            sw2 = float(sliced_wasserstein(x, exact, dirs))
                            rows.append({"mixture": mname, "solver": solver, "spacing": spacing, "range": rname,
                                         "lower_order_final": lof, "target_nfe": target,
                                         "nfe": FAMILIES[solver]["nfe"](steps), "steps": steps, "endpoint": err,
                                         "median_distance": med, "sw2": sw2})
                            print(f"{mname:24s} {solver:8s} {spacing:8s} {rname:10s} lof={lof!s:5s} "
                                  f"nfe={rows[-1]['nfe']:3d} endpoint={err:.3e} median={med:.3e} sw2={sw2:.3e} (floor {floor:.1e})", flush=True)
    report = {"rows": rows, "sw2_floor": floors, "ranges": {k: list(v) for k, v in RANGES.items()},
              "mixtures": {k: {"means": m.means.tolist(), "stds": m.variances[:, 0].sqrt().tolist(),
                               "weights": m.weights.tolist()} for k, m in mixtures().items()},
              "num": args.num, "versions": environment(), "wall_seconds": round(time.perf_counter() - t0, 1),
              "command": " ".join(["scripts/bench_ode_levels.py", *(sys.argv[1:] if argv is None else argv)])}
    print_table(rows, args.nfe)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out} ({report['wall_seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
