"""Memory checks made before anything large is allocated, so that a config that cannot fit is
refused with one line saying what would fit, instead of growing until the kernel kills the process.

Each command's check adds up its parts: network activations and data as diffctl/memory_estimates.py
measures them (the network once on the meta device), weights, optimizer and sampler state, and the
images held until their file is written. Refused only when the estimate exceeds `REFUSE_ABOVE` times
what is available (MemAvailable on CPU, torch.cuda.mem_get_info on GPU), so no config that fits is
refused; `memory_check=false` skips it.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from diffctl.errors import ConfigError
from diffctl.memory_estimates import batch_bytes, network_bytes, on_meta

REFUSE_ABOVE = 1.5  # refuse only what clearly does not fit: real/estimate measured 0.82-1.38 (U-Net, DiT; train, inference)
ADAM_COPIES = 4  # per parameter in training: the parameter, its gradient's optimizer pair (exp_avg, exp_avg_sq), the EMA


class MemoryRefused(ConfigError):
    """The config needs more memory than the machine has."""


def gib(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n / 2**20:.2g} MiB"


def available(device: torch.device) -> tuple[int, str] | None:
    """(free bytes, where the number comes from) for `device`; None when it cannot be read."""
    if device.type == "cuda":
        try:
            return torch.cuda.mem_get_info(device)[0], f"free on {device} (torch.cuda.mem_get_info)"
        except Exception:  # no driver / not initialised: nothing to compare with
            return None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "available RAM (MemAvailable in /proc/meminfo)"
    except OSError:
        pass
    return None


def largest(value: int, scale: float, power: float, multiple: int = 1) -> int:
    """The largest value (a multiple of `multiple`) whose cost, growing as value**power, shrinks by `scale`."""
    return max(int(value * scale ** (1 / power)) // multiple * multiple, 0)


def refuse_if_over(parts: dict[str, int], device: torch.device, what: str, fits: Callable[[int], str]) -> None:
    """Raise MemoryRefused if sum(parts) clearly exceeds what `device` has free; fits(free bytes) says what would fit."""
    have = available(device)
    need = sum(parts.values())
    if have is None or need <= REFUSE_ABOVE * have[0]:
        return
    detail = ", ".join(f"{k} {gib(v)}" for k, v in parts.items() if v)
    try:
        advice = fits(have[0])
    except Exception:  # the estimate at other sizes failed: say what is known
        advice = "use a smaller batch or resolution"
    raise MemoryRefused(
        f"{what} needs about {gib(need)} ({detail}), more than the {gib(have[0])} {have[1]}; {advice} "
        "(memory_check=false skips this check)"
    )


def _split(parts: dict[str, int], device: torch.device, host: dict[str, int], what: str, fits) -> None:
    """Check `parts` on `device` and `host` in host RAM (all together when the device is the CPU)."""
    if device.type == "cpu":
        refuse_if_over({**parts, **host}, device, what, lambda free: fits(free, True))
    else:
        refuse_if_over(parts, device, what, lambda free: fits(free, True))
        refuse_if_over(host, torch.device("cpu"), what, lambda free: fits(free, False))


def _largest_batch(total: Callable[[int], int], batch: int, free: int) -> int:
    """Largest batch whose cost, linear in the batch (fixed + b * per sample), fits in `free`."""
    b2 = max(batch, 2)
    t1, t2 = total(1), total(b2)
    per = (t2 - t1) / (b2 - 1)
    return int((free - (t1 - per)) // per) if per > 0 else batch


def _skip(cfg) -> bool:
    import os

    rank = int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) or 0)  # rank 0 checks, once
    return cfg.get("memory_check", True) is False or rank > 0


# Images the built-in datasets hold in memory (both splits; diffctl.data), and its limit for a resized copy.
_HELD = {"digits": (1797, 64), "mnist": (70000, 784), "fashion_mnist": (70000, 784), "cifar10": (60000, 3072)}


def check_train(cfg, datamodule, shape: dict) -> None:
    """`diffctl train`: network activations, weights and Adam state at data.batch_size and data.resolution,
    and the data pipeline; before the dataset or the network is built."""
    if _skip(cfg):
        return
    from hydra.utils import get_class

    from diffctl.build import build_conditioner, instantiate_config
    from diffctl.data import ArrayImageDataset
    from diffctl.performance import accelerator_type

    device = torch.device(accelerator_type(cfg.trainer.get("accelerator", "auto")))
    devices = cfg.trainer.get("devices", 1)
    procs = devices if device.type == "cpu" and isinstance(devices, int) and devices > 0 else 1
    batch, res, c, k = datamodule.batch_size, datamodule.resolution, datamodule.channels, shape["num_classes"]
    conditioner = build_conditioner(cfg, shape)  # an image condition's source channels go into the network too
    e = conditioner.extra_channels if conditioner is not None else 0
    io = {"in_channels": c + e, "out_channels": c} if e else {"in_channels": c}
    # + the target network of objectives that keep one (consistency models); the objective config has no
    # name key, so ask its class (this read `objective.name` and never counted the target before issue 16)
    copies = ADAM_COPIES + bool(getattr(get_class(cfg.objective._target_), "needs_target", False))
    half = "16" in str(cfg.trainer.get("precision", "32"))
    # trainer.strategy=fsdp: each device holds 1/N of the weights and optimizer state (N processes in
    # all); the unit gathered while it runs is left out (one DiT block: under 4% of DiT-XL/2).
    world = devices * cfg.trainer.get("num_nodes", 1) if isinstance(devices, int) and devices > 0 else 1
    shards = world if cfg.trainer.get("strategy") == "fsdp" else 1

    def device_parts(b: int, r: int) -> dict[str, int]:
        with torch.device("meta"):
            net = instantiate_config(cfg.model, "model", **io, resolution=r, num_classes=k)
        act = (network_bytes(net, b, (c + e, r, r), k, "params") or 0) // (2 if half else 1)
        weights = sum(p.numel() * p.element_size() for p in net.parameters()) * copies // shards
        return {"network activations": act * procs, "weights and optimizer state": weights * procs}

    def host_parts(b: int, r: int) -> dict[str, int]:
        n, native = _HELD.get(datamodule.name, (0, 0))
        held = n * native + min(n * c * r * r, ArrayImageDataset.PRESIZE_LIMIT_BYTES)
        return {"data": (batch_bytes(b, (c, r, r), datamodule.num_workers) + held) * procs}

    def fits(free: int, on_device: bool) -> str:
        part = device_parts if on_device else host_parts
        def total(b, r=res):
            return sum(part(b, r).values()) + (sum(host_parts(b, r).values()) if on_device and device.type == "cpu" else 0)
        most = _largest_batch(total, batch, free)
        text = f"at data.resolution={res} at most data.batch_size={most} fits" if most >= 1 else \
            f"at data.resolution={res} not even data.batch_size=1 fits"
        def need(r: int) -> float:
            try:
                return total(batch, r)
            except Exception:  # e.g. a resolution the network does not take
                return math.inf

        # Activations and data grow at least as resolution**2 (attention faster): scale down until it
        # fits, then bisect between that and the last size that did not (multiples of 8).
        high, r = res, res
        for _ in range(12):
            n = need(r)
            if n <= free or r < 8:
                break
            high, r = r, largest(r, free / n if n < math.inf else 0.25, 2, 8)
        for _ in range(8):
            mid = (r + high) // 16 * 8
            if r < 8 or mid <= r:
                break
            r, high = (mid, high) if need(mid) <= free else (r, mid)
        return text + (f"; about data.resolution={r} fits at data.batch_size={batch}" if r >= 8 else "")

    _split(device_parts(batch, res), device, host_parts(batch, res), f"training at data.resolution={res} with data.batch_size={batch}", fits)


def _batch_fits(total: Callable[[int], int], key: str, batch: int) -> Callable[[int, bool], str]:
    def fits(free: int, on_device: bool) -> str:
        most = _largest_batch(total, batch, free)
        return f"at most {key}={most} fits" if most >= 1 else f"not even {key}=1 fits: free memory or use a machine with more"
    return fits


def _procs(cfg, device: torch.device) -> int:
    devices = cfg.trainer.get("devices", 1) if cfg.get("trainer") is not None else 1
    return devices if device.type == "cpu" and isinstance(devices, int) and devices > 0 else 1


def check_batches(cfg, source, device: torch.device, num: int, what: str, copies: int = 1,
                  extra: Callable[[int], dict[str, int]] | None = None, outputs: str = "samples") -> None:
    """A command that makes `num` images in batches of cfg.batch_size (sample, inpaint): one batch
    through the network (`copies` of it at once), the batch's state (x, eps, x0, history; RePaint's
    known images and mask are no larger), extra(b)'s parts per process, and every image held on the
    host until its file is written (with an image condition's sources and targets). `what` names the work in the refusal ("sampling")."""
    if _skip(cfg) or source.denoiser.backbone is None:
        return
    shape, dim, k = tuple(source.shape), math.prod(source.shape), source.denoiser.capabilities.num_classes
    e = source.denoiser.conditioner.extra_channels  # an image condition's source channels are network input too
    net_in = (shape[0] + e, *shape[1:])
    procs = _procs(cfg, device)
    batch = min(cfg.batch_size, -(-num // procs))  # no batch is larger than a process's share

    def parts(b: int) -> dict[str, int]:
        act = network_bytes(source.denoiser.backbone, b * copies, net_in, k, None) or 0
        out = {"network activations": act * procs, "sampler state": 6 * b * dim * 4 * procs}  # x, eps, x0, history
        return {**out, **{key: v * procs for key, v in (extra(b) if extra else {}).items()}}

    host = {outputs: 3 * num * math.prod(getattr(source, "image_shape", shape))}  # uint8: per batch, concatenated, gathered for the file
    if e:  # sample source=: every image's source, as shown, and its target, float32 (img2img_job.Sources)
        host["source images"] = 4 * num * (dim // shape[0]) * (e + 2 * shape[0])
    total = lambda b: sum(parts(b).values()) + (sum(host.values()) if device.type == "cpu" else 0)  # noqa: E731
    _split(parts(batch), device, host, f"{what} with batch_size={batch}", _batch_fits(total, "batch_size", batch))


def check_sample(cfg, source, device: torch.device) -> None:
    """`diffctl sample`: check_batches with two network batches under guidance and, with classifier
    guidance, the classifier's forward and gradient in x per call."""
    classifier = _classifier_forward(getattr(source, "classifier", None))
    codec = getattr(source, "codec", None)
    decoder = on_meta(codec.autoencoder.decoder) if codec is not None else None  # latent models decode each batch

    def extra(b: int) -> dict[str, int]:
        parts = {}
        if classifier is not None:
            parts["classifier activations"] = network_bytes(classifier, b, tuple(source.shape), 0, "input") or 0
        if decoder is not None:
            parts["decoder activations"] = network_bytes(lambda z, _t, _y: decoder(z), b, tuple(source.shape), 0, None) or 0
        return parts

    guided = 2 if float(cfg.guidance) != 1.0 else 1
    check_batches(cfg, source, device, cfg.num_samples, "sampling", guided, extra if classifier or decoder else None)


def _classifier_forward(classifier) -> Callable | None:
    """A trained noisy classifier's network as network_bytes runs it (x, noise label) on meta; None
    for none or the exact mixture classifier (closed form, no network)."""
    net = getattr(classifier, "net", None)
    if not isinstance(net, torch.nn.Module):
        return None
    forward = on_meta(net)
    return lambda x, t, _labels: forward(x, t)


def check_likelihood(cfg, source, device: torch.device) -> None:
    """`diffctl likelihood`: a forward and a vector-Jacobian product per ODE evaluation, dopri5's stages."""
    if _skip(cfg) or source.denoiser.backbone is None:
        return
    shape, dim, k = tuple(source.shape), math.prod(source.shape), source.denoiser.capabilities.num_classes

    def parts(b: int) -> dict[str, int]:
        act = network_bytes(source.denoiser.backbone, b, shape, k, "input") or 0
        return {"network activations": act, "ODE state": 10 * b * dim * 4, "data": batch_bytes(b, shape)}

    total = lambda b: sum(parts(b).values())  # noqa: E731
    _split(parts(cfg.batch_size), device, {}, f"likelihood with batch_size={cfg.batch_size}",
           _batch_fits(total, "batch_size", cfg.batch_size))


def check_fid_stats(cfg, src: dict) -> None:
    """`diffctl fid-stats`: the images of one detector batch decoded at data.resolution."""
    if _skip(cfg) or not isinstance(src, dict):
        return
    batch, res, c = cfg.metrics.batch_size, src["resolution"], src["channels"]
    parts = {"data": batch_bytes(batch, (c, res, res))}

    def fits(free: int, on_device: bool) -> str:
        r = largest(res, free / parts["data"], 2)
        return f"about data.resolution={r} fits at metrics.batch_size={batch}" if r >= 1 else "free memory"

    _split(parts, torch.device("cpu"), {}, f"reference features at data.resolution={res}", fits)
