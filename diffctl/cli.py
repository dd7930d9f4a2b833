"""The `diffctl` console script: subcommands dispatched to Hydra applications."""

from __future__ import annotations

import functools
import os
import re
import sys
from importlib import resources
from pathlib import Path

import diffctl  # noqa: F401  (torchvision shim before lightning/torchmetrics import it)
from diffctl.errors import DiffctlError

def config_dir() -> Path:
    """conf/ ships inside the wheel as the `diffctl.conf` package; in a source checkout that was
    not installed it is the top-level conf/ directory next to the package."""
    try:
        path = Path(str(resources.files("diffctl.conf")))
        if (path / "train.yaml").is_file():
            return path
    except ModuleNotFoundError:
        pass
    return Path(__file__).resolve().parent.parent / "conf"


def run_dir_name(root: str) -> str:
    """Directory for a new run: <root>/<date>/<time with microseconds>.

    Ranks started by torchrun or SLURM each run Hydra themselves, so they must agree on the name
    without talking: they use the launcher's shared job id. If there is none (torchrun without
    --rdzv-id/--standalone), ranks > 0 put their Hydra logs in a temporary directory instead of
    creating a second run directory; they write no outputs of their own.
    """
    env = os.environ
    run_id = env.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":
        return f"{root}/torchrun-{run_id}"
    if env.get("SLURM_JOB_ID") and env.get("SLURM_NTASKS", "1") != "1":
        return f"{root}/slurm-{env['SLURM_JOB_ID']}-{env.get('SLURM_STEP_ID', '0')}"
    rank = int(env.get("RANK", env.get("SLURM_PROCID", "0")) or 0)
    if rank > 0:
        import tempfile

        return tempfile.mkdtemp(prefix=f"diffctl-rank{rank}-")
    from datetime import datetime

    now = datetime.now()
    return f"{root}/{now:%Y-%m-%d}/{now:%H-%M-%S-%f}"


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("diffctl_run_dir"):
        OmegaConf.register_new_resolver("diffctl_run_dir", run_dir_name, use_cache=True)


_register_resolvers()


def config_groups() -> dict[str, list[str]]:
    root = config_dir()
    groups = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        choices = sorted(f.stem for f in d.glob("*.yaml"))
        if choices:
            groups[d.name] = choices
    return groups


def _print_error(err: BaseException | str) -> None:
    from rich.console import Console
    from rich.markup import escape

    # escaped: messages quote shapes and lists ("[16, 1, 3, 3]"), which rich would read as markup
    Console(stderr=True, highlight=False).print(f"[bold red]error:[/] {escape(str(err))}", soft_wrap=True)


def _full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


# ---------------------------------------------------------------- out of memory


def _out_of_memory(err: BaseException) -> str | None:
    """The allocator's message if `err` is an out-of-memory error, also one that ended a sampling
    worker process (torch.multiprocessing hands the parent the worker's traceback as text)."""
    import torch
    from torch.multiprocessing import ProcessRaisedException

    if isinstance(err, torch.OutOfMemoryError):
        text = str(err)
    elif isinstance(err, ProcessRaisedException):
        lines = [line for line in str(err).splitlines() if line.startswith(("torch.OutOfMemoryError", "torch.cuda.OutOfMemoryError"))]
        if not lines:
            return None
        text = lines[-1].split(":", 1)[1]
    else:
        return None
    # CUDA's message is a paragraph; its first two sentences say what failed and how much was asked for.
    sentences = " ".join(text.split()).split(". ")
    return ". ".join(sentences[:2]).rstrip(".") or "out of memory"


def _sample_batching(cfg) -> tuple:
    """(the config the sampling ran with, its run directory): on resume= the interrupted run's."""
    from hydra.core.hydra_config import HydraConfig

    if cfg.get("resume"):
        from diffctl.sample import _resume_config

        try:
            return _resume_config(cfg)
        except DiffctlError:
            pass
    return cfg, Path(HydraConfig.get().runtime.output_dir)


def _out_of_memory_advice(cfg, detail: str) -> str:
    """One line for an out-of-memory error: what ran out, the batch size in use and the smaller one to try."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    command = HydraConfig.get().job.config_name
    if command == "sample":
        cfg, run = _sample_batching(cfg)
        if (run / "samples.npz").is_file():  # the samples were made; the detector ran out scoring them
            size = cfg.metrics.batch_size
            return (f"out of memory computing metrics with metrics.batch_size={size} ({detail}); the samples are saved "
                    f"in {run}: score them with `diffctl sample resume={run} metrics.batch_size={max(size // 2, 1)}`")
        from diffctl.sample import _batch_dependent

        size = cfg.batch_size
        head = f"out of memory sampling with batch_size={size} ({detail})"
        if size == 1:
            return f"{head}; the batch cannot be smaller: free device memory or use a device with more"
        if _batch_dependent(cfg.sampler) or not (run / ".hydra" / "config.yaml").is_file():
            return f"{head}; run again with a smaller batch, e.g. batch_size={size // 2}"
        return (f"{head}; continue with a smaller batch, keeping the finished ones: "
                f"`diffctl sample resume={run} batch_size={size // 2}`")
    doing, key = {"train": ("training", "data.batch_size"), "likelihood": ("computing likelihoods", "batch_size"),
                  "fid_stats": ("extracting reference features", "metrics.batch_size")}.get(command, ("", None))
    size = OmegaConf.select(cfg, key) if key else None
    if not isinstance(size, int) or size < 2:
        return f"out of memory ({detail}); free device memory or use a device with more"
    head = f"out of memory {doing} with {key}={size} ({detail}); run again with a smaller batch, e.g. {key}={size // 2}"
    if command == "train":  # the same batch per optimizer step in two micro-batches
        accumulate = OmegaConf.select(cfg, "trainer.accumulate_grad_batches") or 1
        return f"{head} trainer.accumulate_grad_batches={2 * accumulate} (the same batch per optimizer step)"
    return head


# ---------------------------------------------------------------- resuming a checkpoint that does not fit

_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from checkpoint, "
    r"the shape in current model is torch\.Size\((\[[^\]]*\])\)"
)


def _resume_mismatch(err: BaseException, cfg) -> str | None:
    """`train resume=`: Lightning loads the checkpoint with a strict load_state_dict, whose error lists
    every mismatched tensor over many lines; one line naming the first (None: not that error)."""
    text = str(err)
    if not (isinstance(err, RuntimeError) and text.startswith("Error(s) in loading state_dict") and cfg.get("resume")):
        return None
    from diffctl.build import REFIT_ADVICE

    match = _SIZE_MISMATCH.search(text)
    details = [line.strip() for line in text.splitlines()[1:] if line.strip()]
    first = f"{match[1]} is {match[2]} in the file but {match[3]} in the network" if match else (details or [""])[0]
    return f"resume={cfg.resume}: the checkpoint does not fit the network its config builds: {first}; {REFIT_ADVICE}"


def _task_error(err: BaseException, cfg) -> str | None:
    """One line for the failures of a task that are not DiffctlErrors but have a known fix."""
    detail = _out_of_memory(err)
    if detail is not None:
        return _out_of_memory_advice(cfg, detail)
    return _resume_mismatch(err, cfg)


def user_errors(task):
    """Turn DiffctlError (and the failures _task_error knows) into one line on stderr and exit code 1
    (HYDRA_FULL_ERROR=1 shows the traceback)."""

    @functools.wraps(task)
    def wrapper(cfg):
        try:
            return task(cfg)
        except DiffctlError as err:
            if _full_error():
                raise
            _print_error(err)
            sys.exit(1)
        except Exception as err:
            message = None if _full_error() else _task_error(err, cfg)
            if message is None:
                raise
            _print_error(message)
            sys.exit(1)

    return wrapper


# The code object every task runs under: an exception whose traceback passes through it came from
# the task itself, not from Hydra setting up the run.
_TASK_CODE = user_errors(lambda cfg: None).__code__


def _raised_in_task(err: BaseException) -> bool:
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is _TASK_CODE:
            return True
        tb = tb.tb_next
    return False


# ---------------------------------------------------------------- Hydra's own errors


def _hydra_error(err: Exception, multirun: bool) -> str | None:
    """One line for an error Hydra raises before or around the task (a config group choice or key that
    does not exist, an unparsable override, a run directory it cannot create); None: not one of those."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    if isinstance(err, MissingConfigException):
        group, _, choice = (err.missing_cfg_file or "").rpartition("/")
        if err.options and group:
            return f"{group}={choice}: there is no config {err.missing_cfg_file!r}; choose one of: {', '.join(err.options)}"
    if isinstance(err, ConfigCompositionException) and isinstance(err.__cause__, (ConfigAttributeError, ConfigKeyError)):
        key = getattr(err.__cause__, "full_key", None)
        append = re.search(r"use (\+\S+)", str(err))  # Hydra's hint: the override with a leading +
        if key:
            command = sys.argv[0] if sys.argv and sys.argv[0].startswith("diffctl") else "diffctl <command>"
            return (f"{key}: no such config key; check its spelling (`{command} --cfg job` prints every key)"
                    + (f", or add it as a new key with {append.group(1)}" if append else ""))
    if isinstance(err, (ConfigCompositionException, OverrideParseException)):
        text = str(err).split("Config search path:")[0]
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        cause = str(err.__cause__).splitlines()[0] if err.__cause__ is not None and str(err.__cause__) else ""
        return " ".join(lines + ([f"({cause})"] if cause else [])) or None
    if isinstance(err, OSError) and err.filename is not None and not _raised_in_task(err):
        key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        return f"cannot create or write the run directory ({err.strerror}: {err.filename}); choose a writable one with {key}=<dir>"
    return None


def _condense_hydra_errors(multirun: bool) -> None:
    """Print Hydra's own errors as one line too. Hydra reports them (with its config search path and a
    HYDRA_FULL_ERROR hint, or a traceback for OSErrors) in hydra._internal.utils.run_and_report; this
    wraps that function. Should a later Hydra move it, its own messages are shown unchanged."""
    try:
        from hydra._internal import utils as hydra_utils
    except ImportError:
        return
    original = getattr(hydra_utils, "run_and_report", None)
    if original is None:
        return
    original = getattr(original, "__wrapped__", original)

    def condensed(func):
        try:
            return func()
        except Exception as err:
            message = None if _full_error() else _hydra_error(err, multirun)
            if message is None:
                raise
            _print_error(message)
            sys.exit(1)

    @functools.wraps(original)
    def run_and_report(func):
        return original(functools.partial(condensed, func))

    hydra_utils.run_and_report = run_and_report


def _train_task(cfg):
    from diffctl.train import train

    result = train(cfg)
    # Hydra sweepers (Optuna) optimise the task's return value.
    return result["loss"] if cfg.get("optimized_metric") == "train/loss" else result


def _sample_task(cfg):
    from diffctl.sample import sample

    return sample(cfg)


def _fid_stats_task(cfg):
    from diffctl.fid_stats import fid_stats

    return fid_stats(cfg)


def _export_task(cfg):
    from diffctl.export import export

    return export(cfg)


def _likelihood_task(cfg):
    from diffctl.likelihood import likelihood

    return likelihood(cfg)


# command -> (Hydra task, config name, one-line description)
SUBCOMMANDS = {
    "train": (_train_task, "train", "train a diffusion model"),
    "sample": (_sample_task, "sample", "generate images from a checkpoint (samples.npz, PNG grid, metrics.json)"),
    "fid-stats": (_fid_stats_task, "fid_stats", "precompute reference statistics for FID/KID"),
    "likelihood": (_likelihood_task, "likelihood", "negative log-likelihood (bits/dim) via the probability-flow ODE"),
    "export": (_export_task, "export", "write a checkpoint's EMA (or raw) weights as .safetensors + config JSON"),
}


def _usage() -> str:
    lines = [
        "usage: diffctl <command> [key=value ...] [--multirun] [--help]",
        "",
        "commands:",
    ]
    lines += [f"  {name:<10} {desc}" for name, (_, _, desc) in SUBCOMMANDS.items()]
    lines += ["", "config groups (choose with group=choice):"]
    lines += [f"  {g:<15} {' | '.join(c)}" for g, c in config_groups().items()]
    lines += [
        "",
        "examples:",
        "  diffctl train                                 # offline quickstart (digits, small U-Net, VP, DDPM loss)",
        "  diffctl train model=dit sde=ve objective=ncsn trainer.max_steps=2000",
        "  diffctl train --multirun model=unet,dit sde=vp,ve",
        "  diffctl sample sampler=ode steps=50           # sample from the newest checkpoint under outputs/",
        "  diffctl fid-stats data=cifar10 data.root=data # cache FID/KID reference statistics",
        "  diffctl likelihood num_batches=4              # bits/dim of the test split (PF-ODE, Hutchinson trace)",
        "  diffctl train --help                          # every config key of train",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command in ("-V", "--version"):
        print(diffctl.__version__)
        return 0
    if command not in SUBCOMMANDS:
        _print_error(f"unknown command {command!r}; choose one of: {', '.join(SUBCOMMANDS)} (see `diffctl --help`)")
        return 2
    import hydra

    task, config_name, _ = SUBCOMMANDS[command]
    # Hydra reads sys.argv; its program name shows up in --help output.
    sys.argv = [f"diffctl {command}", *rest]
    _condense_hydra_errors(multirun=any(arg in ("-m", "--multirun") for arg in rest))
    app = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)(user_errors(task))
    app()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
