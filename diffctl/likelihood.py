"""`diffctl likelihood`: NLL of a checkpoint's data split (bits/dim) or of exact mixture samples
(model=gmm, nats/dim next to the exact value), written to likelihood.json and a table. The
formulas and their conventions (PF-ODE, divergence estimators, dequantization) are in
diffctl/ode_likelihood.py."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import Tensor

from diffctl.image_conditions import refuse_source_models
from diffctl.conditioning import CLASS_LABEL, IMAGE
from diffctl.errors import ConfigError
from diffctl.files import create_new, json_text
from diffctl.memory import check_likelihood
from diffctl.ode_likelihood import CONVENTIONS, bits_per_dim, check_trace, dequantize, log_likelihood
from diffctl.rundir import claims_run_dir
from diffctl.noise import sample_generators
from diffctl.signals import interruptible


def _check_options(cfg: DictConfig) -> None:
    """Everything checkable without a checkpoint: done before loading anything."""
    from diffctl.networks.gmm import GaussianMixture, is_mixture

    # Types and ranges: the schema (diffctl/schema/keys.py), checked first in likelihood(); here the combinations.
    model = cfg.get("model")
    if model is not None and not is_mixture(model):
        raise ConfigError("likelihood takes a trained network from its checkpoint (ckpt=...); model= only selects the analytic model=gmm")
    if model is None and cfg.get("sde") is not None:
        raise ConfigError("sde= applies to model=gmm only; a checkpoint is evaluated with the SDE it was trained with")
    if model is not None and cfg.ckpt:
        raise ConfigError("model=gmm is the analytic model and needs no checkpoint; drop ckpt= (or model=gmm)")
    if model is not None:
        check_trace(cfg.trace, cfg.probe, GaussianMixture.from_config(model).dim)
        if cfg.num_batches is None:
            raise ConfigError("model=gmm draws its data: set num_batches (an integer >= 1)")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(str(name))
    except RuntimeError:
        raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}") from None


def _stats(values: Tensor) -> tuple[float, float | None]:
    """Mean and standard error (ddof 1) of per-sample values."""
    v = values.double()
    se = float(v.std() / math.sqrt(len(v))) if len(v) > 1 else None
    return float(v.mean()), se


def _kept(cfg: DictConfig) -> str:
    return "nothing was written (likelihood.json appears only once every batch is done); run the command again to compute it"


@interruptible(_kept)  # SIGTERM/SIGINT: one line, exit 1
@claims_run_dir("likelihood")  # refuses a used run directory, locks it while writing
def likelihood(cfg: DictConfig) -> dict[str, Any]:
    """`diffctl likelihood`: NLL of a checkpoint's data split (bits/dim) or of exact mixture samples
    (model=gmm, nats/dim next to the exact value); likelihood.json and a table in the run dir."""
    from hydra.core.hydra_config import HydraConfig

    from diffctl.checkpoint import resolve_checkpoint
    from diffctl.source import load_source, newest_checkpoint
    from diffctl.schema import validate

    validate(cfg, "likelihood")  # every key's type and range, before any work
    _check_options(cfg)
    out_path = Path(HydraConfig.get().runtime.output_dir) / "likelihood.json"
    if out_path.exists():
        raise ConfigError(f"{out_path} already exists; choose another hydra.run.dir (nothing is overwritten)")
    if cfg.get("model") is not None:
        ckpt = None
    else:
        ckpt = str(resolve_checkpoint(cfg.ckpt).resolve() if cfg.ckpt else newest_checkpoint().resolve())
        if not cfg.ckpt:
            print(f"Using the newest checkpoint: {ckpt}")
    source = load_source(cfg, ckpt)
    can = source.denoiser.capabilities
    refuse_source_models(can, source.description, "likelihood")  # its log-likelihood is of x given a source
    if source.codec is not None:  # the PF-ODE gives log p(latents); log p(x) would need the decoder's density too
        raise ConfigError(f"{source.description} is a latent diffusion model: the ODE likelihood is of its latents, not of images, "
                          "so bits/dim would not compare with pixel models; use a pixel-space checkpoint")  # fmt: skip
    mixture = source.mixture if can.analytic else None  # exact answers to compare with
    dim = math.prod(source.shape)
    if not can.pf_ode:
        raise ConfigError("a consistency model defines no probability-flow ODE; use a diffusion (ddpm/ncsn) checkpoint")
    check_trace(cfg.trace, cfg.probe, dim)
    device = _device(cfg.device)
    check_likelihood(cfg, source, device)
    denoiser = source.denoiser.to(device)

    if not can.analytic:
        dataset, data_name = _dataset(cfg, source.data)
        total = len(dataset)
    else:
        dataset, data_name, total = None, "exact samples of the mixture", None
    batch_size = cfg.batch_size
    num = batch_size * cfg.num_batches if cfg.num_batches is not None else total
    note = None
    if total is not None and num > total:
        note = f"the {cfg.split} split has {total} images, fewer than num_batches x batch_size = {num}: all {total} used"
        num = total

    from rich.progress import Progress

    logps, nfes, xs = [], [], []
    dtype = torch.float64 if can.analytic else torch.float32
    start = time.perf_counter()
    with Progress(disable=not cfg.progress_bar) as progress:
        task = progress.add_task(f"likelihood ({cfg.trace} trace)", total=-(-num // batch_size))
        for first in range(0, num, batch_size):
            idx = range(first, min(first + batch_size, num))
            gens = sample_generators(cfg.seed, idx)  # per sample: its data draw / dequantization, then its probe
            if can.analytic:
                x = torch.cat([mixture.sample(1, g)[0] for g in gens]).to(device, dtype)
                cond = {}
            else:
                items = [dataset[i] for i in idx]
                x = torch.stack([item[IMAGE] for item in items]).to(device, dtype)
                labels = {CLASS_LABEL: torch.tensor([item[CLASS_LABEL] for item in items], device=device)}
                cond = denoiser.conditioner.from_batch(labels)  # log p(x | label) with the data's labels
                if cfg.dequantize:
                    x = dequantize(x, gens)
            res = log_likelihood(denoiser, x, cond, trace=cfg.trace, probe=cfg.probe, generators=gens, rtol=cfg.rtol, atol=cfg.atol)
            logps.append(res.logp.cpu())
            nfes.append(res.nfe)
            xs.append(x.cpu())
            progress.advance(task)
    elapsed = time.perf_counter() - start
    logp = torch.cat(logps)

    result: dict[str, Any] = {
        "checkpoint": source.description,
        "weights": "exact" if can.analytic else "ema" if cfg.use_ema else "raw",
        "sde": source.denoiser.sde.name,
        "data": data_name,
        "dim": dim,
        "num_samples": num,
        "batch_size": batch_size,
        "trace": cfg.trace,
        "probe": cfg.probe if cfg.trace == "hutchinson" else None,
        "rtol": cfg.rtol,
        "atol": cfg.atol,
        "nfe_per_batch": round(sum(nfes) / len(nfes), 1),
        "seed": cfg.seed,
        "time_s": round(elapsed, 3),
    }
    if not can.analytic:
        result["conditional"] = bool(can.num_classes)  # log p(x | label) with the data's labels
        result["dequantize"] = cfg.dequantize
        result["bits_per_dim"], result["bits_per_dim_se"] = _stats(bits_per_dim(logp, dim))
        result["conventions"] = CONVENTIONS["dequantized" if cfg.dequantize else "raw"]
    else:
        x = torch.cat(xs)
        t_eps = torch.tensor(denoiser.sde.eps, dtype=torch.float64)
        exact = mixture.log_prob(x, denoiser.sde.alpha(t_eps), denoiser.sde.sigma(t_eps)).cpu()
        nll, exact_nll, data_nll = -logp / dim, -exact / dim, -mixture.log_prob(x).cpu() / dim
        result["nats_per_dim"], result["nats_per_dim_se"] = _stats(nll)
        result["exact_nats_per_dim"], result["exact_nats_per_dim_se"] = _stats(exact_nll)
        result["exact_data_nats_per_dim"] = _stats(data_nll)[0]
        result["error_nats_per_dim"], result["error_nats_per_dim_se"] = _stats(nll - exact_nll)  # paired: same points
        result["max_abs_error_nats_per_dim"] = float((nll - exact_nll).abs().max())
        result["conventions"] = CONVENTIONS["gmm"]
    if note:
        result["note"] = note
    create_new(out_path, json_text(result), "already exists; choose another hydra.run.dir (nothing is overwritten)")
    _print_table(result, out_path)
    return result


def _dataset(cfg: DictConfig, data_cfg: DictConfig):
    """The checkpoint's dataset, split `cfg.split`, at the resolution/channels it was trained on (offline)."""
    from diffctl.data import build_dataset

    root = cfg.data_root if cfg.get("data_root") else data_cfg.get("root")
    dataset = build_dataset(
        data_cfg.name, root, cfg.split, data_cfg.get("resolution"), data_cfg.get("channels"),
        random_flip=False, download=False, limit=None,
    )  # fmt: skip
    return dataset, f"{data_cfg.name}:{cfg.split}"


TABLE_KEYS = (
    "sde", "data", "num_samples", "trace", "probe", "nfe_per_batch", "time_s", "bits_per_dim", "nats_per_dim",
    "exact_nats_per_dim", "exact_data_nats_per_dim", "error_nats_per_dim", "max_abs_error_nats_per_dim",
)  # fmt: skip


def _print_table(result: dict[str, Any], out_path: Path) -> None:
    from rich.console import Console

    from diffctl.console import result_table, value_rows

    def with_se(key: str, text: str) -> tuple[str, str]:
        se = result.get(f"{key}_se")
        return key, (f"{text} ± {se:.2g}" if se is not None else text)

    console = Console(highlight=False)
    console.print(result_table("diffctl likelihood", [with_se(k, v) for k, v in value_rows(result, TABLE_KEYS, digits=5)]))
    console.print(f"conventions: {result['conventions']}", soft_wrap=True)
    if result.get("note"):
        console.print(f"note: {result['note']}")
    console.print(f"results: {out_path}")
