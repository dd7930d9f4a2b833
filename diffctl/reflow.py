"""`diffctl reflow`: rectified flow's reflow (Liu et al. 2023), from a trained flow model to its straighter successor.

Three stages in one run directory, each kept when done, so `diffctl reflow resume=<run dir>` goes on
where a run stopped (the plan in reflow.json is used):
  1. pairs: num_pairs (noise, sample) pairs of the model `ckpt=` names, made by the ODE sampler of
     the config (an index job as `diffctl sample`: sample i depends only on (seed, i), on any number of
     processes, finished batches kept in <run>/partial/), written to <run>/pairs.npz (diffctl/pairs.py);
  2. train: `diffctl train objective=reflow` on the pairs in <run>/train, started from the model's
     weights (its own process, with exact resume from its last checkpoint);
  3. eval: for the model and the reflowed one, `diffctl sample sampler=ddim steps=k` (trailing levels:
     on sde=linear exactly k Euler steps of the flow) at each k of eval.steps in <run>/eval/<who>_<k>,
     their FID, and the straightness of their paths (diffctl/straightness.py) on eval.straightness_samples.
The table and reflow.json hold the straightness and FID before and after.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from diffctl.distill import data_overrides, override_value, read_plan, round_step, run_round
from diffctl.errors import ConfigError
from diffctl.files import atomic_write, atomic_write_json
from diffctl.indexjob import PARTIAL, run_job
from diffctl.launch import device, launch
from diffctl.pairs import PAIRS_FILE
from diffctl.rundir import claims_run_dir
from diffctl.schema import validate
from diffctl.signals import interruptible

PLAN = "reflow.json"  # the plan (what resume= continues) and the results
# What the plan keeps of the command's config; the pairs job reads the sampling keys of it.
PLAN_KEYS = ("ckpt", "use_ema", "num_pairs", "sampler", "steps", "batch_size", "seed", "noise", "clip_denoised", "precision",
             "train_steps", "init_from_teacher", "train_overrides", "eval")  # fmt: skip
PAIR_SHARD_KEYS = ("samples", "noise", "calls")
WHO = {"teacher": "before (the model)", "reflow": "after reflow"}


def make_plan(cfg: DictConfig) -> dict:
    """The plan of a new run, checked before any work: ckpt is a diffusion model with a
    probability-flow ODE in pixel space, with no image condition."""
    from diffctl.source import load_source
    from diffctl.build import resolve_weights

    if not cfg.ckpt:
        raise ConfigError("ckpt must name the flow model to reflow: a `diffctl train` run directory or .ckpt "
                          "(e.g. ckpt=outputs/train/<date>/<time> of `diffctl train sde=linear objective=flow`)")  # fmt: skip
    path = resolve_weights(cfg.ckpt).resolve()
    source = load_source(OmegaConf.create({"use_ema": cfg.use_ema}), str(path))
    can = source.denoiser.capabilities
    if source.codec is not None or can.conditions - {"class_label"} or not can.pf_ode:
        raise ConfigError(f"ckpt={path}: reflow needs a pixel-space diffusion model with a probability-flow ODE and no image "
                          "condition (unconditional or class-conditional)")  # fmt: skip
    sampler = OmegaConf.to_container(cfg.sampler)
    deterministic = sampler["name"] == "ode" or (sampler["name"] == "ddim" and not sampler.get("eta")) or (
        sampler["name"] == "edm" and not sampler.get("S_churn"))  # fmt: skip
    if not deterministic:
        raise ConfigError(f"sampler={sampler['name']} with these options is stochastic: a pair's sample would not be the end of its "
                          "noise's flow. Make pairs with sampler=ode (any solver), sampler=ddim (eta=0) or sampler=edm (S_churn=0)")  # fmt: skip
    if cfg.eval.seed == cfg.seed:
        raise ConfigError(f"eval.seed={cfg.eval.seed} is the pairs' seed: the reflowed model was trained on those noises; "
                          "choose another eval.seed")  # fmt: skip
    plan = {key: OmegaConf.to_container(cfg[key]) if OmegaConf.is_config(cfg[key]) else cfg[key] for key in PLAN_KEYS}
    data = {"data": OmegaConf.to_container(source.data, resolve=True)}  # the reflowed model's data config: the model's
    return {**plan, "ckpt": str(path), "data": data_overrides(data), "results": {}}


# --------------------------------------------------------------------------- 1. pairs
def pairs_job_config(plan: dict, trainer: dict, progress: bool) -> dict:
    """The sample-like config the pairs job runs with (diffctl.generation reads these keys)."""
    keys = ("use_ema", "sampler", "steps", "batch_size", "seed", "noise", "clip_denoised", "precision")
    return {**{k: plan[k] for k in keys}, "num_samples": plan["num_pairs"], "class_label": None, "guidance": 1.0,
            "compile": False, "channels_last": "auto", "trainer": trainer, "progress_bar": progress}  # fmt: skip


def pairs_share(fabric, cfg: dict, ckpt: str, run: str) -> None:
    """One process's share of the pairs (diffctl.launch); rank 0 writes pairs.npz."""
    from diffctl.generation import sampling_model
    from diffctl.pairs import pairs_batch_maker
    from diffctl.source import load_source

    cfg, run = OmegaConf.create(cfg), Path(run)
    source = load_source(cfg, ckpt)
    dev = device(fabric, cfg.trainer.accelerator)
    sampling = sampling_model(cfg, source, dev)
    make = pairs_batch_maker(cfg, source, sampling, dev)
    job = run_job(fabric, cfg.num_samples, cfg.batch_size, run / PARTIAL, make, progress=cfg.progress_bar,
                  what="pairs", unit="pairs", required=PAIR_SHARD_KEYS)  # fmt: skip
    if fabric is None or fabric.global_rank == 0:
        arrays = {k: job.arrays[k].numpy() for k in ("noise", "samples", "labels") if k in job.arrays}
        atomic_write(run / PAIRS_FILE, lambda f: np.savez(f, **arrays))
        shutil.rmtree(run / PARTIAL, ignore_errors=True)


def make_pairs(plan: dict, run: Path, cfg: DictConfig) -> None:
    if (run / PAIRS_FILE).is_file():
        print(f"pairs: done, kept in {run / PAIRS_FILE}")
        return
    print(f"pairs: {plan['num_pairs']} (noise, sample) pairs with sampler={plan['sampler']['name']} steps={plan['steps']}")
    trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
    launch(trainer, pairs_share, (pairs_job_config(plan, trainer, bool(cfg.progress_bar)), plan["ckpt"], str(run)),
           lambda: _kept_text(run), what="pairs")  # fmt: skip


# --------------------------------------------------------------------------- 2. train
def train_command(plan: dict, run: Path) -> list[str]:
    train_dir = run / "train"
    args = ["train", "objective=reflow", f"objective.teacher={override_value(plan['ckpt'])}",
            f"objective.pairs={override_value(str(run / PAIRS_FILE))}", f"objective.init_from_teacher={override_value(plan['init_from_teacher'])}",
            *plan["data"], "data.random_flip=false", f"trainer.max_steps={plan['train_steps']}", *plan["train_overrides"],
            f"hydra.run.dir={override_value(str(train_dir))}"]  # fmt: skip
    if (train_dir / "checkpoints" / "last.ckpt").is_file():
        args.append(f"resume={override_value(str(train_dir))}")
    return args


def train_reflow(plan: dict, run: Path) -> None:
    if round_step(run / "train") >= plan["train_steps"]:
        print(f"train: done, kept in {run / 'train'}")
        return
    print(f"train: {plan['train_steps']} steps of objective=reflow in {run / 'train'}")
    run_round(train_command(plan, run), "the reflow training's")


# --------------------------------------------------------------------------- 3. eval
def sample_command(plan: dict, who: str, k: int, run: Path, cfg: DictConfig) -> list[str]:
    out = run / "eval" / f"{who}_{k}"
    ckpt = plan["ckpt"] if who == "teacher" else str(run / "train")
    ev = plan["eval"]
    if (out / PARTIAL).is_dir():  # an interrupted sample run: continue it (its log in a directory of its own)
        return ["sample", f"resume={override_value(str(out))}", f"hydra.run.dir={override_value(str(out / '.resume'))}"]
    return ["sample", f"ckpt={override_value(ckpt)}", "sampler=ddim", "sampler.spacing=trailing", f"steps={k}",
            f"num_samples={ev['num_samples']}", f"seed={ev['seed']}", f"batch_size={plan['batch_size']}",
            f"use_ema={override_value(plan['use_ema'])}", f"clip_denoised={override_value(plan['clip_denoised'])}",
            f"trainer.devices={cfg.trainer.devices}", f"trainer.accelerator={cfg.trainer.accelerator}",
            f"progress_bar={override_value(bool(cfg.progress_bar))}", *ev["sample_overrides"],
            f"hydra.run.dir={override_value(str(out))}"]  # fmt: skip


def evaluate(plan: dict, run: Path, cfg: DictConfig) -> dict:
    from diffctl.reflow_report import measure_straightness

    results = plan.setdefault("results", {})
    for who in WHO:
        row = results.setdefault(who, {})
        for k in plan["eval"]["steps"]:
            out = run / "eval" / f"{who}_{k}"
            if not (out / "metrics.json").is_file():
                print(f"eval: {WHO[who]}, {k} step{'s' if k > 1 else ''}")
                run_round(sample_command(plan, who, k, run, cfg), "an evaluation's")
            metrics = json.loads((out / "metrics.json").read_text())
            row[f"fid_{k}"] = metrics.get("fid")
            row[f"kid_{k}"] = metrics.get("kid")
        if "straightness" not in row:
            ckpt = plan["ckpt"] if who == "teacher" else str(run / "train")
            row.update(measure_straightness(plan, ckpt, device(None, cfg.trainer.accelerator)))
        atomic_write_json(run / PLAN, plan)
    return results


def _kept_text(run: Path) -> str:
    return f"finished stages are kept in {run}; continue with: diffctl reflow resume={run}"


def _kept(cfg) -> str:
    run = Path(str(cfg.resume)).expanduser() if cfg.get("resume") else Path(HydraConfig.get().runtime.output_dir)
    return _kept_text(run)


@claims_run_dir("reflow")
@interruptible(_kept)
def reflow(cfg: DictConfig) -> dict[str, Any]:
    validate(cfg, "reflow")
    if cfg.get("resume"):
        run = Path(str(cfg.resume)).expanduser().resolve()
        plan = read_plan(run, PLAN, "reflow")
    else:
        run = Path(HydraConfig.get().runtime.output_dir).resolve()
        plan = make_plan(cfg)
        atomic_write_json(run / PLAN, plan)
    make_pairs(plan, run, cfg)
    train_reflow(plan, run)
    evaluate(plan, run, cfg)
    from diffctl.reflow_report import report

    return report(plan, run)
