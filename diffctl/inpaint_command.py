"""`diffctl inpaint`: fill the masked region of images with a checkpoint (RePaint or plain
replacement, diffctl/inpaint.py), on one or more devices, and write inpainted.npz, inpaint_grid.png
and metrics.json (PSNR/SSIM of the inpainted region against the original images).

The orchestration of `diffctl sample` (diffctl/sample.py): images 0..N-1 are cut into contiguous
shards, one per process (trainer.devices), and batches; image i depends only on (seed, i), so the
output is the same for any number of processes and batch size. Every finished batch is written at
once to <run dir>/partial/; `diffctl inpaint resume=<run dir>` continues an interrupted run with its
own config (diffctl.resume) and writes the same outputs as an uninterrupted one.

The pieces (checks, batches, outputs) are in diffctl/inpaint_job.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from diffctl.build import resolve_weights
from diffctl.errors import ConfigError
from diffctl.generation import SHARD_KEYS, sampling_model
from diffctl.indexjob import PARTIAL, run_job
from diffctl.inpaint_job import Inputs, batch_maker, prepare, report, settings, write_outputs
from diffctl.launch import device, launch, sum_over_processes
from diffctl.memory import check_batches
from diffctl.noise import NOISE_VERSION
from diffctl.resume import MANIFEST, kept, manifest, resume_config, run_noise_version
from diffctl.resume_check import check_shards, read_manifest
from diffctl.rundir import claims_run_dir
from diffctl.signals import interruptible
from diffctl.source import Source, load_source, newest_checkpoint

def _kept(run: Path | DictConfig) -> str:
    """What an interrupted run (its directory, or the command's config) left, for the line that ends it."""
    if isinstance(run, DictConfig):
        run = Path(str(run.resume)).expanduser().resolve() if run.get("resume") else Path(HydraConfig.get().runtime.output_dir)
    return kept(run, "inpaint")


def _checkpoint(cfg: DictConfig, recorded: dict | None) -> str:
    """The checkpoint to load: the one a resumed run started with, else ckpt= (null: the newest)."""
    if recorded is not None and recorded.get("ckpt"):
        return recorded["ckpt"]
    if cfg.ckpt:
        return str(resolve_weights(cfg.ckpt).resolve())
    ckpt = str(newest_checkpoint().resolve())
    print(f"Using the newest checkpoint: {ckpt}")
    return ckpt


@interruptible(_kept)  # SIGTERM/SIGINT: stops its worker processes too, one line saying how to resume
@claims_run_dir("inpaint")  # refuses a used run directory, locks it (and a resumed one) while writing
def inpaint_command(cfg: DictConfig) -> dict[str, Any]:
    from diffctl.schema import validate

    validate(cfg, "inpaint")  # every key's type and range (diffctl/schema/keys.py), before any work
    from diffctl.console import route_library_logs

    route_library_logs()
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    resuming = bool(cfg.get("resume"))
    if resuming:  # no option adapts to the whole batch: batch_size and trainer.devices may change
        cfg, out_dir = resume_config(cfg, "inpaint", lambda stored: False)
    partial = out_dir / PARTIAL
    if not resuming and any(partial.glob("shard-*.npz")):
        raise ConfigError(f"{out_dir} holds unfinished images of an interrupted run; continue it with resume={out_dir}, or choose another hydra.run.dir")
    recorded = read_manifest(partial / MANIFEST) if resuming else None
    if recorded is not None:  # the interrupted run's own noise
        cfg.noise = run_noise_version(recorded)
    ckpt = _checkpoint(cfg, recorded)
    source = load_source(cfg, ckpt)
    inputs = prepare(cfg, source)  # model, images, mask, labels, schedule: before any process is started
    if resuming:  # every finished shard fits this run, before any new image is made
        c, h, w = source.shape
        done = check_shards(partial, len(inputs), (h, w, c), np.uint8, None)
        print(f"Resuming {out_dir}: {done} of {len(inputs)} images already inpainted")
    # memory, before any process is started: sample's estimate (one batch through the network, its
    # state, the images held until inpainted.npz); RePaint's jumps keep nothing more per step
    check_batches(cfg, source, device(None, cfg.trainer.accelerator), len(inputs), "inpainting", outputs="inpainted images")
    manifest(out_dir, ckpt, resuming, int(cfg.get("noise", NOISE_VERSION)))
    plain_cfg = OmegaConf.to_container(cfg, resolve=True)
    return launch(plain_cfg["trainer"], inpaint_share, (plain_cfg, ckpt, str(out_dir)), lambda: _kept(out_dir),
                  what="inpainting", source=source, inputs=inputs)  # fmt: skip


def inpaint_share(fabric, cfg: dict, ckpt: str, out_dir: str, source: Source | None = None, inputs: Inputs | None = None) -> dict | None:
    """One process's share of the work (diffctl.launch); rank 0 writes the outputs and returns the
    result. source/inputs: already loaded by the caller (one process), else loaded here."""
    cfg = OmegaConf.create(cfg)
    out_dir = Path(out_dir)
    source = source or load_source(cfg, ckpt)
    inputs = inputs or prepare(cfg, source)
    rank, world = (fabric.global_rank, fabric.world_size) if fabric is not None else (0, 1)
    dev = device(fabric, cfg.trainer.accelerator)
    # sample's model wrapper (clip_denoised, compile and precision as there, no guidance) with its count of network calls
    sampling = sampling_model(cfg, source, dev)
    partial = out_dir / PARTIAL
    make = batch_maker(cfg, source, inputs, sampling, dev)
    job = run_job(fabric, len(inputs), cfg.batch_size, partial, make, progress=cfg.progress_bar, what="inpainting",
                  required=SHARD_KEYS)  # fmt: skip
    num = len(inputs)
    result = {
        "checkpoint": source.description,
        "weights": source.weights,
        **settings(cfg),
        "resample": 1 if cfg.method == "replace" else cfg.resample,  # replace never jumps back
        "clip_denoised": sampling.clipped,
        "precision": sampling.precision,
        "compile": sampling.compile,
        "nfe_per_sample": round(sum(job.per_batch["calls"]) / job.batches, 2) if job.batches else 0,
        "num_images": num,
        "devices": world,
        "time_s": round(job.elapsed, 3),
        "images_per_s": round(num / job.elapsed, 2),
    }
    if cfg.get("resume"):  # this invocation made only the missing images
        made_all = sum_over_processes(fabric, job.made)
        result["resumed_images"] = num - made_all
        result["images_per_s"] = round(made_all / job.elapsed, 2)
    if rank != 0:
        return None
    result.update(write_outputs(out_dir, inputs, job.arrays["samples"], cfg.seed))
    report(out_dir, result)
    shutil.rmtree(partial, ignore_errors=True)  # everything is written: the finished batches are no longer needed
    return result
