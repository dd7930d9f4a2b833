"""How failures reach the user: one line on stderr and exit code 1, for diffctl's own errors, the
failures with a known fix (out of memory, a checkpoint that does not fit on resume) and Hydra's own
errors (unknown group choice or key, unwritable run directory). HYDRA_FULL_ERROR=1 shows everything."""

from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path

from diffctl.errors import DiffctlError


def print_error(err: BaseException | str) -> None:
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
        from diffctl.generation import sample_resume_config

        try:
            return sample_resume_config(cfg)
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
        from diffctl.generation import batch_dependent

        size = cfg.batch_size
        head = f"out of memory sampling with batch_size={size} ({detail})"
        if size == 1:
            return f"{head}; the batch cannot be smaller: free device memory or use a device with more"
        if batch_dependent(cfg.sampler) or not (run / ".hydra" / "config.yaml").is_file():
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
            print_error(err)
            sys.exit(1)
        except Exception as err:
            message = None if _full_error() else _task_error(err, cfg)
            if message is None:
                raise
            print_error(message)
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


def _raised_in_submitit(err: BaseException) -> bool:
    """Whether `err` came from the submitit library (the SLURM launcher plugin), not from a job."""
    tb = err.__traceback__
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    return bool(frames) and f"{os.sep}submitit{os.sep}" in frames[-1]


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
    group = re.match(r"Could not override '(\w+)'", str(err)) if isinstance(err, ConfigCompositionException) else None
    if group:  # a training group (condition=, objective=, data=) given to a command that reads a checkpoint
        from diffctl.cli import config_dir

        name = group.group(1)
        if (config_dir() / name).is_dir():
            return (f"{name}= is chosen when training (`diffctl train {name}=...`) and is not a key of this command; "
                    f"a checkpoint brings its own {name}: drop {name}=")  # fmt: skip
    if isinstance(err, (ConfigCompositionException, OverrideParseException)):
        text = str(err).split("Config search path:")[0]
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        cause = str(err.__cause__).splitlines()[0] if err.__cause__ is not None and str(err.__cause__) else ""
        return " ".join(lines + ([f"({cause})"] if cause else [])) or None
    if _raised_in_submitit(err):
        if "srun" in str(err):
            return ("hydra/launcher=slurm submits jobs with SLURM's sbatch/srun, which this machine does not have; run the "
                    "sweep on a SLURM login node, or drop hydra/launcher=slurm to run the jobs here")
        return f"the SLURM launcher (submitit) failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}"
    if isinstance(err, OSError) and err.filename is not None and not _raised_in_task(err):
        key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        return f"cannot create or write the run directory ({err.strerror}: {err.filename}); choose a writable one with {key}=<dir>"
    return None


def condense_hydra_errors(multirun: bool) -> None:
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
            print_error(message)
            sys.exit(1)

    @functools.wraps(original)
    def run_and_report(func):
        return original(functools.partial(condensed, func))

    hydra_utils.run_and_report = run_and_report
