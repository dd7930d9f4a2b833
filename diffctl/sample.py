"""`diffctl sample`: load a checkpoint (or build the analytic model=gmm), generate on one or more
devices, and write samples.npz, a PNG grid and metrics.json.

With trainer.devices=K the sample indices 0..N-1 are cut into K contiguous shards, one per process;
sample i depends only on (seed, i), so the images are the same for any K and any batch size.

Resumable: every finished batch is written at once (temporary file, then os.replace) to
<run dir>/partial/shard-<first>-<stop>.npz by the process that made it. `diffctl sample resume=<run dir>`
reloads that run's config (.hydra/config.yaml), keeps the finished samples, makes the rest and writes
the same samples.npz and metrics as an uninterrupted run; partial/ is removed once all is written.

An image-to-image checkpoint (`diffctl train condition=sr|colorize|inpaint`) samples one output per
image of source= (diffctl/img2img_job.py: the sources and batches; diffctl/img2img_report.py: the
outputs and the PSNR/SSIM/consistency metrics); the orchestration is the same.

This module orchestrates; the jobs are elsewhere: checks (sample_checks), the model sampled
(source), the batches (generation), shards/resume (indexjob, resume, resume_check), processes
(launch) and the outputs (sample_report).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from diffctl.build import resolve_weights
from diffctl.checkpoint import resolve_checkpoint
from diffctl.errors import ConfigError, DiffctlError
from diffctl.generation import batch_maker, check_resume_shards, sample_resume_config, sampling_model, shard_keys
from diffctl.image_conditions import SOURCE
from diffctl.img2img_job import Sources, read_sources, source_batch_maker, targets_reference
from diffctl.img2img_report import source_settings, write_source_outputs
from diffctl.indexjob import PARTIAL, run_job
from diffctl.launch import device, launch, sum_over_processes
from diffctl.memory import check_sample
from diffctl.noise import NOISE_VERSION
from diffctl.resume import MANIFEST, kept, manifest, run_noise_version
from diffctl.resume_check import read_manifest
from diffctl.rundir import claims_run_dir
from diffctl.sample_checks import check_fits, check_options
from diffctl.sample_report import print_table, write_metrics, write_samples
from diffctl.signals import interruptible
from diffctl.source import Source, load_source, newest_checkpoint


def _kept(run: Path | DictConfig) -> str:
    """What an interrupted run (its directory, or the command's config) left, for the line that ends it."""
    if isinstance(run, DictConfig):
        run = Path(str(run.resume)).expanduser().resolve() if run.get("resume") else Path(HydraConfig.get().runtime.output_dir)
    return kept(run, "sample")


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
        cfg, out_dir = sample_resume_config(cfg)
    check_options(cfg)
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
    classifier = None  # a trained classifier's checkpoint file, as the worker processes and a resume read it
    if cfg.get("classifier") and cfg.classifier != "exact":
        if recorded is not None and recorded.get("classifier"):
            classifier = recorded["classifier"]
        else:
            classifier = str(resolve_checkpoint(cfg.classifier, "classifier").resolve())
        cfg.classifier = classifier
    source = load_source(cfg, ckpt)
    check_fits(cfg, source)  # before any process is started
    sources = None  # image-to-image (source=): every source image, read and checked before any process is started
    if SOURCE in source.denoiser.capabilities.conditions:
        sources = read_sources(cfg, source)
        cfg.num_samples = len(sources)  # one output per source image
    check_sample(cfg, source, device(None, cfg.trainer.accelerator))  # memory, before any process is started
    if resuming:  # every finished shard fits this run, before any new sample is made
        done = check_resume_shards(cfg, source, partial)
    manifest(out_dir, ckpt, resuming, int(cfg.get("noise", NOISE_VERSION)), classifier)
    if resuming:
        print(f"Resuming {out_dir}: {done} of {cfg.num_samples} samples already made")
    plain_cfg = OmegaConf.to_container(cfg, resolve=True)
    return launch(plain_cfg["trainer"], sample_share, (plain_cfg, ckpt, str(out_dir)), lambda: _kept(out_dir), source=source,
                  sources=sources)  # fmt: skip


def sample_share(fabric, cfg: dict, ckpt: str | None, out_dir: str, source: Source | None = None,
                 sources: Sources | None = None) -> dict[str, Any] | None:  # fmt: skip
    """One process's share of the work (diffctl.launch); rank 0 writes the outputs and returns the
    result. `source`: the model when the caller already loaded it (ckpt None: model=gmm); `sources`:
    an image-to-image model's source images, likewise (else read here)."""
    cfg = OmegaConf.create(cfg)
    out_dir = Path(out_dir)
    source = source or load_source(cfg, ckpt)
    if sources is None and SOURCE in source.denoiser.capabilities.conditions:
        sources = read_sources(cfg, source)
    rank, world = (fabric.global_rank, fabric.world_size) if fabric is not None else (0, 1)
    dev = device(fabric, cfg.trainer.accelerator)
    sampling = sampling_model(cfg, source, dev)
    partial = out_dir / PARTIAL
    if sources is not None:
        make = source_batch_maker(cfg, source, sources, sampling, dev)
    else:
        make = batch_maker(cfg, source, sampling, dev)
    job = run_job(fabric, cfg.num_samples, cfg.batch_size, partial, make, progress=cfg.progress_bar, required=shard_keys(cfg))
    all_images, all_labels = job.arrays["samples"], job.arrays.get("labels")

    result = {
        "checkpoint": source.description,
        "weights": source.weights,
        "sampler": cfg.sampler.name,
        **{f"sampler.{k}": v for k, v in cfg.sampler.items() if k != "name"},
        "steps": cfg.steps,
        "guidance": float(cfg.guidance),
        **({"classifier": cfg.classifier, "classifier_scale": float(cfg.classifier_scale)} if cfg.get("classifier") else {}),
        "clip_denoised": sampling.clipped,
        "precision": sampling.precision,
        "compile": sampling.compile,
        "channels_last": sampling.channels_last,
        "nfe_per_sample": round(sum(job.per_batch["calls"]) / job.batches, 2),  # network calls
        **({"classifier_calls_per_sample": round(sum(job.per_batch["classifier_calls"]) / job.batches, 2)}
           if cfg.get("classifier") else {}),  # fmt: skip
        "num_samples": cfg.num_samples,
        "devices": world,
        "seed": cfg.seed,
        "noise": cfg.noise,
        "time_s": round(job.elapsed, 3),
        "images_per_s": round(cfg.num_samples / job.elapsed, 2),
    }
    if cfg.get("resume"):  # this invocation made only the missing samples
        made_all = sum_over_processes(fabric, job.made)
        result["resumed_samples"] = cfg.num_samples - made_all
        result["images_per_s"] = round(made_all / job.elapsed, 2)
    if rank == 0 and sources is not None:  # outputs with their sources and targets, and the image metrics
        result.update(source_settings(cfg, sources, source.denoiser.conditioner))
        result.update(write_source_outputs(out_dir, all_images, sources, source.denoiser.conditioner))
    elif rank == 0:  # samples first: whatever happens to the metrics, the images are kept
        write_samples(out_dir, all_images, all_labels, source.mixture)
    ref = None if sources is None else targets_reference(cfg, sources)  # FID/KID of outputs against their targets
    metrics_error = _score(cfg, source, job.mine["samples"], all_images, result, rank, dev, ref)
    if rank == 0:
        write_metrics(out_dir, result)
        print_table(result, out_dir)
        if metrics_error is None:  # everything is written: the finished batches are no longer needed
            shutil.rmtree(partial, ignore_errors=True)
    if metrics_error is not None:
        raise type(metrics_error)(f"{metrics_error} (the samples were saved in {out_dir})")
    return result if rank == 0 else None


def _score(cfg: DictConfig, source: Source, mine, all_images, result: dict, rank: int, dev, ref=None) -> DiffctlError | None:
    """Adds the sample metrics to `result`: distances to the exact distribution for the analytic
    model, else the configured image metrics (FID, KID, IS) of every process's share; returns their
    error, if any, so that metrics.json is written first. `ref`: reference images in memory
    (diffctl.references.InMemory) instead of metrics.ref."""
    can = source.denoiser.capabilities
    if can.analytic:  # distances to the exact distribution instead of FID
        if rank == 0 and cfg.class_label is None and can.num_classes == 0:
            from diffctl.distances import mixture_report

            result.update(mixture_report(all_images, source.mixture, cfg.seed))
    elif cfg.get("metrics") is not None and cfg.metrics.names:
        from diffctl.metrics import evaluate

        try:  # shards are contiguous and in rank order, as evaluate() needs
            nchw = mine.permute(0, 3, 1, 2).contiguous()
            scores = evaluate(nchw, cfg.metrics, source.data, dev, ref=ref)
            if result.get("notes") and scores.get("notes"):  # the image-to-image metrics' notes too
                scores["notes"] = f"{result['notes']}; {scores['notes']}"
            result.update(scores)
        except DiffctlError as err:
            return err
    return None
