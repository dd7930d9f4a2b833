"""Golden outputs: pinned before the issue-16 redesign, so that the redesign provably changes nothing.

Every sampler x SDE on a tiny trained network (tests/golden/tiny.*: a 40-step conditional digits
run, exported) and on the analytic mixture, every parameterization, guidance, clipping, the
objectives' losses, a short training run, likelihoods and two whole `diffctl sample` runs, each
with fixed seeds. The outputs were written once (tests/golden/outputs.safetensors, by
`python tests/test_golden.py --write` on the code before the redesign) and must stay bitwise equal
on CPU. One thread: a different thread count may reorder float reductions.

Bitwise equality across machines needs one arithmetic everywhere: the outputs are computed in a
child process with PyTorch's baseline kernels (ATEN_CPU_CAPABILITY=default, not the AVX2/AVX-512
ones a CPU would pick), MKL's reproducible mode (MKL_CBWR=COMPATIBLE) and oneDNN off. The first
file was written on one machine's AVX-512 kernels and did not reproduce on an AVX2 CPU (80 values
off by up to 1e-5, and chaotic ones by more); it was rewritten in this portable mode on 2026-12-02 from
the code at 932a66a, which had matched the pre-redesign file bitwise on that machine (issue 16's note).

Only the builders (`_network`, `_mixture`, ...) may follow an API change; the stored numbers never
do. A difference that is intended must be explained in the issue note and the file rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden"
OUTPUTS = GOLDEN / "outputs.safetensors"
NET = GOLDEN / "tiny.safetensors"

SDES = ("vp", "vpsub", "ve")
# (id, sampler spec, steps): every sampler and option family, a few steps each.
SAMPLERS = [
    ("ddpm", {"name": "ddpm"}, 4),
    ("ddpm-large-uniform", {"name": "ddpm", "variance": "large", "spacing": "uniform"}, 4),
    ("ddim", {"name": "ddim"}, 4),
    ("ddim-eta-leading", {"name": "ddim", "eta": 0.5, "spacing": "leading"}, 4),
    ("ddim-quadratic", {"name": "ddim", "spacing": "quadratic"}, 4),
    ("ddim-karras", {"name": "ddim", "spacing": "karras"}, 4),
    ("pc", {"name": "pc"}, 3),
    ("pc-em-langevin", {"name": "pc", "predictor": "euler_maruyama", "corrector": "langevin", "corrector_steps": 2}, 3),
    ("pc-ancestral-large", {"name": "pc", "predictor": "ancestral", "corrector": "none", "variance": "large"}, 3),
    ("pc-ald-logsnr", {"name": "pc", "predictor": "none", "corrector": "ald", "snr": 0.1, "spacing": "logsnr"}, 3),
    ("ode-euler", {"name": "ode", "solver": "euler"}, 4),
    ("ode-heun-sigma", {"name": "ode", "solver": "heun", "sigma_max": 20.0, "sigma_min": 0.01}, 3),
    ("ode-rk4", {"name": "ode", "solver": "rk4"}, 3),
    ("ode-dpmpp", {"name": "ode"}, 4),
    ("ode-dpmpp-uniform", {"name": "ode", "spacing": "uniform", "lower_order_final": False}, 4),
    ("ode-adaptive", {"name": "ode", "solver": "adaptive", "rtol": 1e-2, "atol": 1e-2}, 1),
]
N = 4  # samples per case
MIX_N = 64


@contextmanager
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- builders (may follow the API)
def _sde(name: str):
    from diffctl.sde import SubVPSDE, VESDE, VPSDE

    return {"vp": VPSDE, "vpsub": SubVPSDE, "ve": lambda: VESDE(sigma_min=0.02, sigma_max=10.0)}[name]()


def _net_state():
    from safetensors.torch import load_file

    return load_file(str(NET))


def _network(sde_name: str, prediction: str = "eps", guidance: float = 1.0, clip: bool = False):
    """The exported tiny U-Net under another SDE / parameterization: (model, labels for N samples)."""
    from diffctl.conditioning import ClassConditioner
    from diffctl.denoiser import ClippedModel, DiffusionModel, GuidedModel
    from diffctl.networks import UNet
    from diffctl.parameterization import make_parameterization

    net = UNet(in_channels=1, resolution=8, num_classes=10, base_channels=16, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4])
    sde = _sde(sde_name)
    den = DiffusionModel(net, sde, make_parameterization(prediction, sde, 0.5, True), ClassConditioner(10, 0.2))
    den.load_state_dict(_net_state())
    den.eval()
    model = GuidedModel(den, guidance) if guidance != 1.0 else den
    if clip:
        model = ClippedModel(model)
    return model, {"class_label": torch.arange(N) % 10}


def _mixture_data():
    from diffctl.networks.gmm import GaussianMixture

    return GaussianMixture([[-2.0, 0.0], [1.5, 1.0], [0.5, -2.0]], scales=[0.3, 0.6, 0.4], weights=[0.5, 0.3, 0.2])


def _mixture(sde_name: str, conditional: bool = False, guidance: float = 1.0):
    from diffctl.denoiser import GuidedModel
    from diffctl.networks.gmm import MixtureModel

    den = MixtureModel(_mixture_data(), _sde(sde_name), conditional=conditional)
    cond = {"class_label": torch.arange(MIX_N) % 3} if conditional else {}
    return (GuidedModel(den, guidance) if guidance != 1.0 else den), cond


def _generate(model, cond, num, shape, spec, steps, seed=0, first=0):
    from diffctl.samplers import generate

    return generate(model, num, shape, spec, steps, seed=seed, cond=cond, first_index=first)


def _objective_losses() -> dict[str, torch.Tensor]:
    from diffctl.conditioning import ClassConditioner
    from diffctl.denoiser import DiffusionModel
    from diffctl.networks import UNet
    from diffctl.objectives import ConsistencyObjective, DDPMObjective, NCSNObjective
    from diffctl.parameterization import make_parameterization
    from diffctl.rng import BatchRandom

    x0 = torch.from_numpy(np.load(GOLDEN / "digits8.npy")).float()  # 8 digits, 1x8x8 in [-1, 1]
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 10])  # the last: the null class
    out = {}
    # (id, sde, objective, the network's parameterization: denoiser.prediction, no longer the objective's)
    cases = [("ddpm-simple-eps", "vp", lambda s: DDPMObjective(s), "eps"), ("ddpm-likelihood-v", "vpsub", lambda s: DDPMObjective(s, "likelihood"), "v"),
             ("ddpm-x0", "ve", lambda s: DDPMObjective(s), "x0"), ("ncsn-ve", "ve", NCSNObjective, "score"), ("ncsn-vp", "vp", NCSNObjective, "score"),
             ("ct-ve", "ve", lambda s: ConsistencyObjective(s, num_scales_end=20, total_steps=10), "consistency"),
             ("ct-vp-huber", "vp", lambda s: ConsistencyObjective(s, num_scales_end=20, total_steps=10, metric="pseudo_huber"), "consistency")]  # fmt: skip
    for name, sde_name, make, prediction in cases:
        sde = _sde(sde_name)
        objective = make(sde)
        net = UNet(in_channels=1, resolution=8, num_classes=10, base_channels=16, channel_mult=[1, 2], num_res_blocks=1, attn_resolutions=[4])
        den = DiffusionModel(net, sde, make_parameterization(prediction, sde), ClassConditioner(10))
        den.load_state_dict(_net_state())
        rng = BatchRandom(7, 3, 0, 0, 1, 8, "cpu")
        target = None
        if objective.needs_target:
            import copy

            target = copy.deepcopy(den).requires_grad_(False)
            with torch.no_grad():
                for p in target.parameters():
                    p.mul_(0.99)
        loss = objective.loss(den, x0, {"class_label": labels}, rng, target=target, step=5)
        loss.backward()
        grad = torch.stack([p.grad.double().sum() for p in den.parameters() if p.grad is not None])
        out[f"loss/{name}"] = loss.detach().reshape(1)
        out[f"loss-grad/{name}"] = grad
    return out


def _likelihoods() -> dict[str, torch.Tensor]:
    from diffctl.likelihood import log_likelihood
    from diffctl.samplers import sample_generators

    out = {}
    x = torch.tensor([[-2.0, 0.1], [1.0, 1.0], [0.4, -1.5]], dtype=torch.float64)
    for sde_name in SDES:
        model, _ = _mixture(sde_name)
        out[f"likelihood/gmm-{sde_name}"] = log_likelihood(model, x, rtol=1e-4, atol=1e-4).logp
    model, labels = _network("vp")
    x0 = torch.from_numpy(np.load(GOLDEN / "digits8.npy")).float()[:2]
    lik = log_likelihood(model, x0, {"class_label": labels["class_label"][:2]}, trace="hutchinson", generators=sample_generators(3, range(2)), rtol=1e-2, atol=1e-2)
    out["likelihood/net-vp-hutchinson"] = lik.logp
    return out


def _training(tmp: Path) -> dict[str, torch.Tensor]:
    """A 3-step tiny conditional run (label dropout, flips, EMA): sha256 and per-tensor sums of its EMA weights."""
    sys.path.insert(0, str(HERE))
    from helpers import run_train, tiny_overrides

    run_train(tmp / "train", [*tiny_overrides("unet"), "conditional=true", "label_dropout=0.3", "data.random_flip=true"])
    from diffctl.checkpoint import denoiser_state, load_checkpoint

    state = denoiser_state(load_checkpoint(tmp / "train", "ckpt"), True)
    flat = torch.cat([state[k].reshape(-1).double() for k in sorted(state)])
    digest = hashlib.sha256(b"".join(state[k].numpy().tobytes() for k in sorted(state))).digest()
    return {"train/ema-sums": torch.stack([state[k].double().sum() for k in sorted(state)]), "train/ema-norm": flat.norm().reshape(1),
            "train/ema-sha256": torch.tensor(list(digest), dtype=torch.uint8)}  # fmt: skip


def _commands(tmp: Path) -> dict[str, torch.Tensor]:
    """Two whole `diffctl sample` runs: the exported network (clip, class labels, two batches) and model=gmm."""
    sys.path.insert(0, str(HERE))
    from helpers import run_sample

    out = {}
    run_sample(tmp / "s1", [f"ckpt={NET}", "sampler=ddim", "steps=5", "num_samples=6", "batch_size=4", "metrics.names=[]", "seed=3"])
    with np.load(tmp / "s1" / "samples.npz") as z:
        out["sample/net-ddim"], out["sample/net-ddim-labels"] = torch.from_numpy(z["samples"]), torch.from_numpy(z["labels"])
    run_sample(tmp / "s2", ["model=gmm", "sde=ve", "sampler=pc", "steps=20", "num_samples=50", "batch_size=32", "metrics.names=[]", "seed=5"])
    with np.load(tmp / "s2" / "samples.npz") as z:
        out["sample/gmm-pc"] = torch.from_numpy(z["samples"])
    out["sample/gmm-pc-metrics"] = torch.tensor([json.loads((tmp / "s2" / "metrics.json").read_text())["sw2"]], dtype=torch.float64)
    return out


# --------------------------------------------------------------------------- the cases
def _sampler_outputs() -> dict[str, torch.Tensor]:
    out = {}
    for sde_name in SDES:
        for case, spec, steps in SAMPLERS:
            model, labels = _network(sde_name)
            out[f"net/{sde_name}/{case}"] = _generate(model, labels, N, (1, 8, 8), spec, steps)
            model, labels = _mixture(sde_name)
            out[f"gmm/{sde_name}/{case}"] = _generate(model, labels, MIX_N, (2,), spec, 2 * steps, seed=1)
        for prediction in ("x0", "v", "score"):
            model, labels = _network(sde_name, prediction=prediction)
            out[f"net/{sde_name}/prediction-{prediction}"] = _generate(model, labels, N, (1, 8, 8), {"name": "ddim"}, 4)
        model, labels = _network(sde_name, prediction="consistency")
        for steps in (1, 3):
            out[f"net/{sde_name}/consistency-{steps}"] = _generate(model, labels, N, (1, 8, 8), {"name": "consistency"}, steps)
        model, labels = _mixture(sde_name, conditional=True, guidance=2.5)
        out[f"gmm/{sde_name}/guided-ddpm"] = _generate(model, labels, MIX_N, (2,), {"name": "ddpm"}, 8, seed=2)
        model, labels = _mixture(sde_name, conditional=True)
        out[f"gmm/{sde_name}/conditional-ode"] = _generate(model, labels, MIX_N, (2,), {"name": "ode"}, 6, seed=2)
    for case, spec, steps in (("ddim", {"name": "ddim"}, 4), ("ddpm", {"name": "ddpm"}, 4), ("ode-heun", {"name": "ode", "solver": "heun"}, 3)):
        model, labels = _network("vp", guidance=2.0)
        out[f"net/vp/guided-{case}"] = _generate(model, labels, N, (1, 8, 8), spec, steps)
        model, labels = _network("vp", clip=True)
        out[f"net/vp/clipped-{case}"] = _generate(model, labels, N, (1, 8, 8), spec, steps)
    model, labels = _network("ve", guidance=1.5, clip=True)
    out["net/ve/guided-clipped-pc"] = _generate(model, labels, N, (1, 8, 8), {"name": "pc"}, 3)
    model, labels = _network("vp")  # a batch split: samples 2..3 alone equal samples 2..3 of the batch of 4
    out["net/vp/ddpm-offset"] = _generate(model, {"class_label": labels["class_label"][2:]}, 2, (1, 8, 8), {"name": "ddpm"}, 4, first=2)
    return out


def compute(tmp: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    with _one_thread(), torch.backends.mkldnn.flags(enabled=False):
        out = {**_sampler_outputs(), **_objective_losses(), **_likelihoods(), **_commands(tmp)}
        out.update(_training(tmp))
    return {k: v.detach().contiguous() for k, v in out.items()}


def _differences(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> list[str]:
    problems = []
    for key in sorted(set(got) | set(want)):
        if key not in got or key not in want:
            problems.append(f"{key}: {'missing now' if key not in got else 'not in the golden file'}")
            continue
        a, b = got[key], want[key]
        if a.dtype != b.dtype or a.shape != b.shape:
            problems.append(f"{key}: {a.dtype} {list(a.shape)} now, {b.dtype} {list(b.shape)} golden")
        elif not torch.equal(a, b):
            diff = (a.double() - b.double()).abs().max().item()
            problems.append(f"{key}: differs, max |diff| {diff:.3g}")
    return problems


# the same float arithmetic on any x86 CPU (see the module doc)
PORTABLE = {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def compute_portably(out_file: Path) -> dict[str, torch.Tensor]:
    """compute() in a child process with the portable arithmetic, through out_file."""
    from safetensors.torch import load_file

    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--compute", str(out_file)], cwd=HERE,
                          env={**os.environ, **PORTABLE}, capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(out_file))


def test_outputs_are_bitwise_the_golden_ones(tmp_path):
    from safetensors.torch import load_file

    problems = _differences(compute_portably(tmp_path / "outputs.safetensors"), load_file(str(OUTPUTS)))
    assert not problems, f"{len(problems)} golden outputs changed:\n" + "\n".join(problems)


def test_the_comparison_sees_a_one_ulp_change():
    """The check above can fail: one value moved by one ulp is reported."""
    want = {"a": torch.tensor([1.0, 2.0]), "b": torch.zeros(3)}
    got = {"a": torch.tensor([1.0, torch.nextafter(torch.tensor(2.0), torch.tensor(3.0)).item()]), "b": torch.zeros(3)}
    assert _differences(got, want) == ["a: differs, max |diff| 2.38e-07"]
    assert _differences({"a": want["a"]}, want) == ["b: missing now"]


def _write(force: bool) -> None:
    import tempfile

    from safetensors.torch import save_file

    if OUTPUTS.exists() and not force:
        raise SystemExit(f"{OUTPUTS} exists; the golden outputs are not rewritten unless you pass --force (and say why in the note)")
    with tempfile.TemporaryDirectory() as tmp:
        out = compute_portably(Path(tmp) / "outputs.safetensors")
    save_file(out, str(OUTPUTS))
    print(f"wrote {len(out)} golden outputs to {OUTPUTS}")


if __name__ == "__main__":
    if "--compute" in sys.argv:  # the child process of compute_portably
        import tempfile

        from safetensors.torch import save_file

        import diffctl  # noqa: F401  (its torchvision shim, before anything imports torchvision)

        if torch.backends.cpu.get_cpu_capability() != "DEFAULT" or os.environ.get("MKL_CBWR") != "COMPATIBLE":
            raise SystemExit("the golden outputs are computed only with the portable arithmetic (PORTABLE)")
        with tempfile.TemporaryDirectory() as tmp:
            save_file(compute(Path(tmp)), sys.argv[-1])
        raise SystemExit(0)
    if "--write" not in sys.argv:
        raise SystemExit("usage: python tests/test_golden.py --write [--force]")
    _write("--force" in sys.argv)
