"""Speed switches shared by training, sampling and the benchmarks: NHWC memory layout,
torch.compile, and reduced-precision autocast for sampling. compile and reduced precision are off
by default, channels_last is `auto` (on for CPU); each is measured flipped from its default in
scripts/bench_train.py and scripts/bench_sample.py."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from diffctl.errors import ConfigError
from diffctl.schema.choices import SAMPLE_PRECISIONS

_AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}  # the other SAMPLE_PRECISIONS sample in float32


def _to_channels_last(module: nn.Module, args):
    x = args[0]
    return (x.contiguous(memory_format=torch.channels_last), *args[1:]) if x.dim() == 4 else None


def use_channels_last(value, device_type: str) -> bool:
    """channels_last: true | false | auto (on where measured to help: CPU convolutions through
    oneDNN ran 1.2-1.4x faster in scripts/bench_*.py; off on GPUs, where it was not measured)."""
    if value == "auto":
        return device_type == "cpu"
    if isinstance(value, bool):
        return value
    raise ConfigError(f"channels_last must be true, false or auto, got {value!r}")


def accelerator_type(accelerator: str) -> str:
    """The device type a Lightning `accelerator` setting trains on."""
    if accelerator == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    return "cuda" if accelerator == "gpu" else str(accelerator)


def speed_up(net: nn.Module, channels_last: bool = False, compile: bool = False) -> nn.Module:
    """Apply the switches to a backbone in place (its state_dict keys stay as they are, so
    checkpoints are unaffected) and return it.

    channels_last: weights and every 4-D input in NHWC, which convolution kernels (cuDNN with tensor
    cores, oneDNN on CPU) often run faster; outputs stay NHWC-strided, which every later op accepts.
    compile: `nn.Module.compile`, i.e. torch.compile of the forward; the first calls (and each new
    input shape) pay the compilation.
    """
    if not isinstance(compile, bool):
        raise ConfigError(f"compile must be true or false, got {compile!r}")
    if channels_last:
        net.to(memory_format=torch.channels_last)
        net.register_forward_pre_hook(_to_channels_last)
    if compile:
        net.compile()
    return net


def sampling_autocast(precision: str, device: torch.device):
    """Autocast context for sampling at `precision`. Only the network's matmuls/convolutions run in
    reduced precision; the denoiser casts its output back to the sample dtype, so the sampler's own
    arithmetic (the update of x, noise levels) stays in float32."""
    precision = str(precision)
    if precision not in SAMPLE_PRECISIONS:
        raise ConfigError(f"precision must be one of {' | '.join(SAMPLE_PRECISIONS)}, got {precision!r}")
    dtype = _AUTOCAST.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
