"""`diffctl sample`: load a checkpoint (or build the analytic model=gmm), generate on one or more
devices, and write samples.npz, a PNG grid and metrics.json.

With trainer.devices=K the sample indices 0..N-1 are cut into K contiguous shards, one per process;
sample i depends only on (seed, i), so the images are the same for any K and any batch size.

Resumable: every finished batch is written at once (temporary file, then os.replace) to
<run dir>/partial/shard-<first>-<stop>.npz by the process that made it. `diffctl sample resume=<run dir>`
reloads that run's config (.hydra/config.yaml), keeps the finished samples, makes the rest and writes
the same samples.npz and metrics as an uninterrupted run; partial/ is removed once all is written.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from diffctl.build import build_sde, is_export, load_denoiser, load_export, resolve_weights
from diffctl.checkpoint import atomic_write, file_sha256
from diffctl.conditioning import class_labels
from diffctl.denoiser import ClippedModel, GuidedModel
from diffctl.errors import CheckpointError, ConfigError, DiffctlError
from diffctl.images import save_grid, save_scatter, to_uint8
from diffctl.memory import check_sample
from diffctl.networks.gmm import GaussianMixture, MixtureModel, is_mixture
from diffctl.noise import NOISE_VERSION, NOISE_VERSIONS
from diffctl.performance import sampling_autocast, speed_up, use_channels_last
from diffctl.resume_check import check_shards, read_manifest, read_run_config
from diffctl.rundir import claims_run_dir
from diffctl.samplers import check_fits, check_sampler, generate
from diffctl.sde import VPSDE
from diffctl.signals import interruptible

TABLE_COLUMNS = ("sampler", "steps", "nfe_per_sample", "num_samples", "time_s", "images_per_s", "weights")
METRIC_COLUMNS = ("fid", "kid_mean", "is_mean", "sw2", "sw2_floor", "mean_error", "cov_error", "weights_tv")


@dataclass
class Source:
    """What is sampled: a trained checkpoint or the analytic mixture (model=gmm). What it can do is
    `denoiser.capabilities` (diffctl.denoiser.Capabilities)."""

    denoiser: Any  # the composed model (diffctl.denoiser protocol)
    shape: tuple[int, ...]  # one sample
    data: DictConfig | None = None  # training data config: the metrics' reference
    mixture: GaussianMixture | None = None
    description: str = ""
    weights: str = "exact"  # ema | raw | exact (model=gmm)


def load_source(cfg: DictConfig, ckpt: str | None) -> Source:
    if ckpt is None:
        mixture = GaussianMixture.from_config(cfg.model)
        sde = build_sde(cfg) if cfg.get("sde") is not None else VPSDE()
        denoiser = MixtureModel(mixture, sde, conditional=cfg.model.get("conditional", False))
        return Source(denoiser, mixture.shape, mixture=mixture, description="model=gmm")
    if is_export(ckpt):  # `diffctl export` output: the weights it holds (EMA unless exported with use_ema=false)
        denoiser, train_cfg, weights = load_export(ckpt)
        if cfg.get("use_ema") is False and weights == "ema":
            raise ConfigError(f"{ckpt} holds EMA weights only; for the raw weights export with `diffctl export use_ema=false`")
    else:
        denoiser, train_cfg = load_denoiser(ckpt, use_ema=cfg.use_ema)
        weights = "ema" if cfg.use_ema else "raw"
    shape = train_cfg.data_shape
    return Source(
        denoiser,
        (shape.channels, shape.resolution, shape.resolution),
        data=train_cfg.data,
        description=ckpt,
        weights=weights,
    )


def newest_checkpoint(root: Path = Path("outputs")) -> Path:
    candidates = sorted(root.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise CheckpointError(f"no checkpoint found under {root.resolve()}; train one with `diffctl train` or pass ckpt=")
    return candidates[-1]


def _check_options(cfg: DictConfig) -> None:
    """Checks that need no checkpoint: done before loading anything. Types and ranges are the schema's
    (diffctl/schema/keys.py), checked again here on the config a resume= run continues with."""
    from diffctl.schema import validate

    validate(cfg, "sample", where=f"in {cfg.resume}/.hydra/config.yaml" if cfg.get("resume") else None)
    devices = cfg.trainer.devices
    if devices > cfg.num_samples:
        raise ConfigError(f"trainer.devices={devices} is more than num_samples={cfg.num_samples}; use fewer devices")
    check_sampler(cfg.sampler)  # the combinations of options the schema cannot express
    model = cfg.get("model")
    if model is not None and not is_mixture(model):
        raise ConfigError(
            "sample takes a trained network from its checkpoint (ckpt=...); model= only selects the analytic model=gmm, "
            "which needs no checkpoint"
        )
    if model is None and cfg.get("sde") is not None:
        raise ConfigError("sde= applies to model=gmm only; a checkpoint is sampled with the SDE it was trained with")
    if model is not None and cfg.ckpt:
        raise ConfigError("model=gmm is the analytic model and needs no checkpoint; drop ckpt= (or model=gmm)")
    if model is not None and cfg.clip_denoised:
        raise ConfigError("clip_denoised clips to the image range [-1, 1]; model=gmm data is unbounded, use clip_denoised=null or false")


def _check_fits(cfg: DictConfig, source: Source) -> None:
    """Checks of the sampler options against the checkpoint."""
    can = source.denoiser.capabilities
    check_fits(cfg.sampler.name, can)  # what the sampler needs of the model (its registration)
    num_classes = can.num_classes
    if cfg.class_label is not None:
        if num_classes == 0:
            raise ConfigError(f"class_label was given, but {source.description} is unconditional")
        if not 0 <= int(cfg.class_label) < num_classes:
            raise ConfigError(f"class_label must be in [0, {num_classes - 1}], got {cfg.class_label}")
    if float(cfg.guidance) != 1.0:
        if num_classes == 0:
            raise ConfigError(
                "guidance needs a class-conditional model (train with conditional=true, or model.conditional=true for model=gmm); "
                f"{source.description} is unconditional"
            )
        if not can.null_condition:
            raise ConfigError(
                "guidance needs a checkpoint trained with label_dropout > 0 (its null class was never trained); "
                "use guidance=1 or retrain with e.g. label_dropout=0.1"
            )


def _cond(cfg: DictConfig, source: Source, first: int, n: int, device) -> dict:
    """The cond of samples first..first+n-1: sample i gets class_label, or class i mod num_classes
    (balanced) when class_label is null (the model's conditioner decides)."""
    return source.denoiser.conditioner.for_samples(first, n, device, cfg.class_label)


def shard(num: int, rank: int, world: int) -> range:
    """Rank `rank`'s contiguous share of sample indices 0..num-1 (sizes differ by at most one)."""
    return range(rank * num // world, (rank + 1) * num // world)


PARTIAL = "partial"  # finished batches of a run in progress (shard-<first>-<stop>.npz)
MANIFEST = "manifest.json"  # in PARTIAL: the resolved checkpoint, its sha256 and the noise version
# Keys that may differ when resuming: they do not change the samples.
RESUME_FREE = ("resume", "progress_bar", "metrics")
# These change which samples share a batch: free unless the sampler adapts to the whole batch.
RESUME_BATCHING = ("batch_size", "trainer.devices")


def _batch_dependent(sampler) -> bool:
    return (sampler.name == "ode" and sampler.get("solver") == "adaptive") or (
        sampler.name == "pc" and sampler.get("corrector") == "langevin"
    )


def _override_key(override: str) -> str:
    key = override.split("=", 1)[0].lstrip("+~")
    return key.split("@", 1)[0]


def _resume_config(cfg: DictConfig) -> tuple[DictConfig, Path]:
    """The interrupted run's config (its .hydra/config.yaml) with this command line's harmless
    overrides applied; any override that would change the samples is refused, naming the key."""
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        raise ConfigError("resume= continues one run; it cannot be combined with --multirun")
    run = Path(str(cfg.resume)).expanduser().resolve()
    stored_path = run / ".hydra" / "config.yaml"
    if not run.is_dir() or not stored_path.is_file():
        raise ConfigError(f"resume={cfg.resume}: not a `diffctl sample` run directory (no {stored_path})")
    stored = read_run_config(stored_path, f"resume={cfg.resume}")
    if stored.get("resume"):
        raise ConfigError(f"{run} is the log directory of an earlier resume; resume {stored.resume} itself")
    if (run / "metrics.json").is_file() and not (run / PARTIAL).is_dir():
        raise ConfigError(f"{run} is already complete (samples.npz and metrics.json are there); nothing to resume")
    merged = stored.copy()
    OmegaConf.set_struct(merged, False)
    batch_free = not _batch_dependent(stored.sampler)
    for key in dict.fromkeys(_override_key(o) for o in hydra_cfg.overrides.task):
        new, old = OmegaConf.select(cfg, key), OmegaConf.select(stored, key)
        free = key.split(".")[0] in RESUME_FREE or (batch_free and key in RESUME_BATCHING)
        if not free:
            plain_new = OmegaConf.to_container(new, resolve=True) if OmegaConf.is_config(new) else new
            plain_old = OmegaConf.to_container(old, resolve=True) if OmegaConf.is_config(old) else old
            if plain_new != plain_old:
                raise ConfigError(
                    f"resume: {key} is {plain_old!r} in {run} but {plain_new!r} here, which changes the samples; "
                    f"drop {key}= to continue that run (or start a new run without resume=)"
                )
        OmegaConf.update(merged, key, new, force_add=True)
    merged.resume = str(run)
    return merged, run


def run_noise_version(recorded: dict | None) -> int:
    """The noise version (diffctl.noise) a run's manifest records; none recorded: a run made before
    counter-based noise, i.e. version 1 (one CPU generator per sample)."""
    version = (recorded or {}).get("noise", 1)
    if version not in NOISE_VERSIONS:
        raise ConfigError(f"resume: the run's manifest records noise version {version!r}, which this diffctl does not know "
                          f"(known: {', '.join(map(str, NOISE_VERSIONS))}); resume it with the diffctl that started it")  # fmt: skip
    return version


def _manifest(out_dir: Path, ckpt: str | None, resuming: bool, noise: int) -> None:
    """On resume: the checkpoint of the interrupted run (checked unchanged). Else: record it and
    the noise version."""
    path = out_dir / PARTIAL / MANIFEST
    if resuming and path.is_file():
        recorded = read_manifest(path)
        if recorded.get("ckpt") is not None:
            if not Path(recorded["ckpt"]).is_file():
                raise CheckpointError(f"resume: the run's checkpoint {recorded['ckpt']} no longer exists")
            if file_sha256(recorded["ckpt"]) != recorded["sha256"]:
                raise CheckpointError(
                    f"resume: {recorded['ckpt']} changed since the run started (sha256 differs; was training still writing it?); "
                    "its samples would not match: start a new run"
                )
        return
    if int(os.environ.get("RANK", "0") or 0) == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"ckpt": ckpt, "sha256": file_sha256(ckpt) if ckpt else None, "noise": noise}, indent=2) + "\n"
        tmp = path.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)


def _kept(run: Path | DictConfig) -> str:
    """What an interrupted run (its directory, or the command's config) left, for the line that ends it."""
    if isinstance(run, DictConfig):
        run = Path(str(run.resume)).expanduser().resolve() if run.get("resume") else Path(HydraConfig.get().runtime.output_dir)
    partial = run / PARTIAL
    if (run / "metrics.json").is_file() and not partial.is_dir():
        return f"the run had already finished: its outputs are in {run}"
    done = len({i for f in partial.glob("shard-*.npz") for i in range(*_shard_range(f))}) if partial.is_dir() else 0
    return f"{done} finished samples are kept in {partial}; continue with: diffctl sample resume={run}"


@interruptible(_kept)  # SIGTERM/SIGINT: stops its worker processes too, one line saying how to resume
@claims_run_dir("sample")  # refuses a used run directory, locks it while writing
def sample(cfg: DictConfig) -> dict[str, Any]:
    from diffctl.schema import validate

    validate(cfg, "sample")  # every key's type and range (diffctl/schema/keys.py), before any work
    from diffctl.console import route_library_logs

    route_library_logs()  # Lightning's (Fabric's) log lines once, through Hydra's handlers
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    resuming = bool(cfg.get("resume"))
    if resuming:
        cfg, out_dir = _resume_config(cfg)
    _check_options(cfg)
    partial = out_dir / PARTIAL
    if not resuming and any(partial.glob("shard-*.npz")):
        raise ConfigError(f"{out_dir} holds unfinished samples of an interrupted run; continue it with resume={out_dir}, or choose another hydra.run.dir")
    recorded = read_manifest(partial / MANIFEST) if resuming else None
    if recorded is not None:  # the interrupted run's own noise (a run from before `noise` existed: version 1)
        cfg.noise = run_noise_version(recorded)
    if cfg.get("model") is not None:
        ckpt = None
    elif recorded is not None and recorded.get("ckpt"):
        ckpt = recorded["ckpt"]  # the checkpoint the run started with (ckpt=null: the newest one back then)
    else:
        ckpt = str(resolve_weights(cfg.ckpt).resolve() if cfg.ckpt else newest_checkpoint().resolve())
        if not cfg.ckpt:
            print(f"Using the newest checkpoint: {ckpt}")
    source = load_source(cfg, ckpt)
    _check_fits(cfg, source)  # before any process is started
    check_sample(cfg, source, _device(None, cfg.trainer.accelerator))  # memory, before any process is started
    if resuming:  # every finished shard fits this run, before any new sample is made
        done = _check_resume_shards(cfg, source, partial)
    _manifest(out_dir, ckpt, resuming, int(cfg.get("noise", NOISE_VERSION)))
    if resuming:
        print(f"Resuming {out_dir}: {done} of {cfg.num_samples} samples already made")
    plain_cfg = OmegaConf.to_container(cfg, resolve=True)
    if cfg.trainer.devices == 1:
        result = _run(None, plain_cfg, ckpt, str(out_dir), source)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun: join its processes
        result = _run_in_process_group(plain_cfg, ckpt, str(out_dir))
    else:
        result = _spawn(cfg.trainer.devices, plain_cfg, ckpt, str(out_dir))
    if result is not None and "error" in result:  # a worker's one-line error, raised here in the parent
        raise result["error"][0](result["error"][1])
    return result


def _fabric(trainer_cfg):
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator=trainer_cfg["accelerator"], devices=trainer_cfg["devices"], strategy="ddp")
    fabric.launch()  # joins the process group; processes were started by torchrun or _spawn
    return fabric


def _spawn(devices: int, cfg: dict, ckpt: str | None, out_dir: str) -> dict[str, Any] | None:
    """Start one worker per device that runs only the sampling (not the Hydra command line again).
    Our own entry point rather than Fabric's ddp_spawn, so each worker imports diffctl (and its
    torchvision shim) before Lightning."""
    import logging
    import socket

    import torch.multiprocessing as mp

    from diffctl.signals import deferred, stop_processes

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)  # "Terminating process ...": reported below
    context = None
    try:
        with deferred():  # a signal while starting is acted on once every started process can be stopped
            context = mp.start_processes(
                _worker, args=(devices, port, cfg, ckpt, out_dir, queue), nprocs=devices, start_method="spawn", join=False
            )
        while not context.join():  # torch stops the other workers when one fails
            pass
    except mp.ProcessExitedException as err:  # ended by a signal or an exit code, not by a Python error
        how = f"was stopped by {err.signal_name}" if err.signal_name else f"exited with code {err.exit_code}"
        raise DiffctlError(
            f"sampling process {err.error_index} (pid {err.error_pid}) {how}; the other processes were stopped; {_kept(Path(out_dir))}"
        ) from None
    finally:  # interrupted (SIGTERM/SIGINT of this process) or failed: no worker outlives the command
        if context is not None:
            stop_processes(context.processes)
    return queue.get()


def _worker(rank: int, world: int, port: int, cfg: dict, ckpt: str | None, out_dir: str, queue) -> None:
    from diffctl.signals import die_on_signals

    die_on_signals()  # SIGTERM/SIGINT end a worker at once (its writes are atomic); the parent reports it
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world), "NODE_RANK": "0"}
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    result = _run_in_process_group(cfg, ckpt, out_dir)
    if rank == 0:
        queue.put(result)


def _run_in_process_group(cfg: dict, ckpt: str | None, out_dir: str) -> dict[str, Any] | None:
    """This process's share, inside the process group, which it leaves before returning: gloo's
    threads torn down at interpreter exit can abort a finished worker ("terminate called without an
    active exception", seen in CI)."""
    try:
        return _run(_fabric(cfg["trainer"]), cfg, ckpt, out_dir)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _device(fabric, accelerator: str) -> torch.device:
    if fabric is not None:
        return fabric.device
    if accelerator == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device("cuda" if accelerator == "gpu" else accelerator)


def _run(fabric, cfg: dict, ckpt: str | None, out_dir: str, source: Source | None = None) -> dict[str, Any] | None:
    """One process's share of the work; rank 0 writes the outputs and returns the result.
    `source`: the model when the caller already loaded it (ckpt None: model=gmm)."""
    try:
        cfg = OmegaConf.create(cfg)
        return _sample_shard(fabric, cfg, Path(out_dir), source or load_source(cfg, ckpt))
    except DiffctlError as err:
        return {"error": (type(err), str(err))}


def _sample_shard(fabric, cfg: DictConfig, out_dir: Path, source: Source) -> dict[str, Any] | None:
    rank, world = (fabric.global_rank, fabric.world_size) if fabric is not None else (0, 1)
    device = _device(fabric, cfg.trainer.accelerator)
    denoiser = source.denoiser.to(device)
    can = denoiser.capabilities
    channels_last = denoiser.backbone is not None and use_channels_last(cfg.get("channels_last", False), device.type)
    if denoiser.backbone is not None:  # the analytic model has no network to speed up
        speed_up(denoiser.backbone, channels_last, cfg.get("compile", False))
    calls = [0]
    denoiser.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    model = GuidedModel(denoiser, cfg.guidance) if float(cfg.guidance) != 1.0 else denoiser
    if cfg.clip_denoised or (cfg.clip_denoised is None and can.data_range is not None):  # null: clip bounded data only
        model = ClippedModel(model, *(can.data_range or (-1.0, 1.0)))

    from diffctl.console import JobProgress

    mine = shard(cfg.num_samples, rank, world)
    batches = range(mine.start, mine.stop, cfg.batch_size)
    partial = out_dir / PARTIAL
    partial.mkdir(parents=True, exist_ok=True)
    finished = _read_shards(partial, mine)  # earlier runs' finished samples of this rank's share
    images, labels = [], []
    total_calls, made = 0, 0
    start = time.perf_counter()
    with JobProgress(cfg.progress_bar and rank == 0, "images") as progress:
        task = progress.add_task(f"sampling ({world} process{'es' if world > 1 else ''})", total=len(mine))
        for first in batches:
            n = min(cfg.batch_size, mine.stop - first)
            kept = finished.take(first, n)
            if kept is not None:
                x, y, batch_calls = kept
            else:
                cond = _cond(cfg, source, first, n, device)
                y = class_labels(cond)
                before = calls[0]
                with sampling_autocast(cfg.get("precision", "32-true"), device):
                    x = generate(model, n, source.shape, cfg.sampler, cfg.steps, cfg.seed, cond, device, first, cfg.noise)
                x = to_uint8(x) if can.data_range is not None else x.float().cpu()  # unbounded (model=gmm): raw floats
                y = y.cpu() if y is not None else None
                batch_calls = calls[0] - before
                _write_shard(partial, first, first + n, x, y, batch_calls)
                made += n
            images.append(x)
            if y is not None:
                labels.append(y)
            total_calls += batch_calls
            progress.advance(task, n)
    mine_images = torch.cat(images)
    all_images, all_labels = _gather(fabric, mine_images, torch.cat(labels) if labels else None, cfg.num_samples)
    elapsed = time.perf_counter() - start

    result = {
        "checkpoint": source.description,
        "weights": source.weights,
        "sampler": cfg.sampler.name,
        **{f"sampler.{k}": v for k, v in cfg.sampler.items() if k != "name"},
        "steps": cfg.steps,
        "guidance": float(cfg.guidance),
        "clip_denoised": isinstance(model, ClippedModel),
        "precision": cfg.get("precision", "32-true"),
        "compile": cfg.get("compile", False),
        "channels_last": channels_last,
        "nfe_per_sample": round(total_calls / len(batches), 2),
        "num_samples": cfg.num_samples,
        "devices": world,
        "seed": cfg.seed,
        "noise": cfg.noise,
        "time_s": round(elapsed, 3),
        "images_per_s": round(cfg.num_samples / elapsed, 2),
    }
    if cfg.get("resume"):  # this invocation made only the missing samples
        made_all = _sum(fabric, made)
        result["resumed_samples"] = cfg.num_samples - made_all
        result["images_per_s"] = round(made_all / elapsed, 2)
    if rank == 0:  # samples first: whatever happens to the metrics, the images are kept
        _write_samples(out_dir, all_images, all_labels, source.mixture)
    metrics_error = None
    if can.analytic:  # distances to the exact distribution instead of FID
        if rank == 0 and cfg.class_label is None and can.num_classes == 0:
            from diffctl.distances import mixture_report

            result.update(mixture_report(all_images, source.mixture, cfg.seed))
    elif cfg.get("metrics") is not None and cfg.metrics.names:
        from diffctl.metrics import evaluate

        try:  # shards are contiguous and in rank order, as evaluate() needs
            nchw = mine_images.permute(0, 3, 1, 2).contiguous()
            result.update(evaluate(nchw, cfg.metrics, source.data, device))
        except DiffctlError as err:
            metrics_error = err
    if rank == 0:
        text = json.dumps(result, indent=2) + "\n"
        atomic_write(out_dir / "metrics.json", lambda f: f.write(text.encode()))
        _print_table(result, out_dir)
        if metrics_error is None:  # everything is written: the finished batches are no longer needed
            shutil.rmtree(partial, ignore_errors=True)
    if metrics_error is not None:
        raise type(metrics_error)(f"{metrics_error} (the samples were saved in {out_dir})")
    return result if rank == 0 else None


def _check_resume_shards(cfg: DictConfig, source: Source, partial: Path) -> int:
    """check_shards with what this run's shards hold: uint8 HWC images (model=gmm: float32 samples)
    and the labels _cond gives; returns the number of finished samples."""
    if source.denoiser.capabilities.data_range is not None:
        shape, dtype = (*source.shape[1:], source.shape[0]), np.uint8
    else:
        shape, dtype = tuple(source.mixture.shape), np.float32
    labels = None
    if source.denoiser.capabilities.num_classes > 0:
        labels = lambda first, n: class_labels(_cond(cfg, source, first, n, "cpu")).numpy()  # noqa: E731
    return check_shards(partial, cfg.num_samples, shape, dtype, labels)


def _shard_range(path: Path) -> tuple[int, int]:
    first, stop = path.stem.split("-")[1:3]
    return int(first), int(stop)


def _write_shard(partial: Path, first: int, stop: int, images: torch.Tensor, labels: torch.Tensor | None, calls: int) -> None:
    """One finished batch, all or nothing: a temporary file renamed into place once it is on disk."""
    arrays = {"samples": images.cpu().numpy(), "calls": np.array(calls, dtype=np.int64)}
    if labels is not None:
        arrays["labels"] = labels.cpu().numpy()
    atomic_write(partial / f"shard-{first:010d}-{stop:010d}.npz", lambda f: np.savez(f, **arrays))


class _Finished:
    """Samples that earlier runs finished, by index; take() returns a batch only if all of it is there."""

    def __init__(self, mine: range):
        self.lo = mine.start
        self.owner = np.full(len(mine), -1, dtype=np.int64)  # which piece holds sample lo + j
        self.pieces = []  # (first, samples, labels, calls)

    def add(self, first: int, samples: np.ndarray, labels: np.ndarray | None, calls: int) -> None:
        lo, hi = max(first, self.lo), min(first + len(samples), self.lo + len(self.owner))
        if lo < hi:
            self.owner[lo - self.lo : hi - self.lo] = len(self.pieces)
            self.pieces.append((first, samples, labels, calls))

    def take(self, first: int, n: int):
        owners = self.owner[first - self.lo : first - self.lo + n]
        if len(owners) < n or (owners < 0).any():
            return None
        parts, label_parts, pos = [], [], first
        for run in np.split(owners, np.flatnonzero(np.diff(owners)) + 1):  # runs of samples from one piece
            start, x, y, _ = self.pieces[run[0]]
            parts.append(x[pos - start : pos - start + len(run)])
            if y is not None:
                label_parts.append(y[pos - start : pos - start + len(run)])
            pos += len(run)
        labels = torch.from_numpy(np.concatenate(label_parts)) if label_parts else None
        calls = self.pieces[owners[0]][3]  # the network calls the batch of sample `first` took
        return torch.from_numpy(np.concatenate(parts)), labels, calls


def _read_shards(partial: Path, mine: range) -> _Finished:
    finished = _Finished(mine)
    for path in sorted(partial.glob("shard-*.npz")):
        first, stop = _shard_range(path)
        if stop <= mine.start or first >= mine.stop:
            continue
        try:
            with np.load(path, allow_pickle=False) as z:
                labels = z["labels"] if "labels" in z.files else None
                samples = z["samples"]
                if len(samples) != stop - first or (labels is not None and len(labels) != stop - first):
                    raise ValueError(f"holds {len(samples)} samples, its name says {stop - first}")
                finished.add(first, samples, labels, int(z["calls"]))
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:  # unreadable: make those samples again
            print(f"warning: ignoring unreadable {path} ({str(err).splitlines()[0]}); its samples are made again")
    return finished


def _sum(fabric, value: int) -> int:
    if fabric is None or fabric.world_size == 1:
        return value
    return int(fabric.all_reduce(torch.tensor(value, device=fabric.device), reduce_op="sum").item())


def _gather(fabric, images: torch.Tensor, labels: torch.Tensor | None, num: int):
    """All ranks' shards in index order (the shards are contiguous, so rank order is index order)."""
    if fabric is None or fabric.world_size == 1:
        return images, labels
    pad = -(-num // fabric.world_size)  # all_gather needs equal shapes: pad every shard to the largest

    def gather(t: torch.Tensor) -> torch.Tensor:
        padded = torch.zeros((pad, *t.shape[1:]), dtype=t.dtype, device=fabric.device)
        padded[: len(t)] = t
        parts = fabric.all_gather(padded).cpu()
        return torch.cat([parts[r][: len(shard(num, r, fabric.world_size))] for r in range(fabric.world_size)])

    return gather(images), (gather(labels) if labels is not None else None)


def _write_samples(out_dir: Path, images: torch.Tensor, labels: torch.Tensor | None, mixture: GaussianMixture | None) -> None:
    """samples.npz (uint8 NHWC images, or model=gmm's raw float samples) and a PNG: an image grid,
    or for flat mixture samples a scatter plot of their first two coordinates over exact samples."""
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = images.cpu().numpy()
    arrays = {"samples": samples}
    if labels is not None:
        arrays["labels"] = labels.cpu().numpy()
    atomic_write(out_dir / "samples.npz", lambda f: np.savez(f, **arrays))  # complete or absent, also when interrupted
    if mixture is None:
        save_grid(torch.from_numpy(samples[:64]), out_dir / "samples.png")
    elif len(mixture.shape) == 3 and mixture.shape[0] in (1, 3):
        save_grid(to_uint8(images[:64]), out_dir / "samples.png")
    else:
        exact = mixture.sample(len(images), torch.Generator().manual_seed(0))[0]
        save_scatter(images, out_dir / "samples.png", reference=exact)


def _metric_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """Table rows of the image metrics: KID and IS with their std over subsets/splits, FID marked
    when withheld or biased by a small sample count (the reasons are in the notes below the table)."""
    rows = []
    if result.get("kid_mean") is not None:
        rows.append(("kid (unbiased)", f"{result['kid_mean']:.4g} ± {result['kid_std']:.2g} (std over subsets)"))
    if "fid" in result:
        if result["fid"] is None and "FID withheld" in result.get("notes", ""):
            rows.append(("fid", f"withheld: {result['num_images']} samples are too few (see notes)"))
        elif result["fid"] is not None:
            label = f"fid (biased: N={result['num_images']})" if result.get("fid_small_n") else "fid"
            rows.append((label, f"{result['fid']:.4g}"))
    if result.get("is_mean") is not None:
        rows.append(("is", f"{result['is_mean']:.4g} ± {result['is_std']:.2g} (std over splits)"))
    return rows


def _print_table(result: dict[str, Any], out_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from diffctl.console import print_paths

    table = Table(title="diffctl sample")
    table.add_column("", overflow="fold")
    table.add_column("value", overflow="fold")
    for key in (*TABLE_COLUMNS, *METRIC_COLUMNS):
        if key in ("fid", "kid_mean", "is_mean"):
            continue
        if result.get(key) is not None:
            table.add_row(key, f"{result[key]:.4g}" if isinstance(result[key], float) else str(result[key]))
    for row in _metric_rows(result):
        table.add_row(*row)
    console = Console()
    console.print(table)
    if result.get("ref"):  # not in the table: an .npz reference is a path, which a cell would cut
        images = f"{result['ref_num_images']} images" if result.get("ref_num_images") else "mu/sigma only"
        console.print(f"reference: {result['ref']} ({images}), {result['detector']} detector", soft_wrap=True, highlight=False, markup=False)
    if result.get("notes"):
        for note in result["notes"].split("; "):
            console.print(f"note: {note}", soft_wrap=True, highlight=False, markup=False)
    print_paths({"samples": out_dir / "samples.npz", "grid": out_dir / "samples.png", "metrics": out_dir / "metrics.json"}, console)
