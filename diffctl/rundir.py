"""A run directory is never reused silently, and only one process writes it at a time.

Every command that writes a run directory claims it: `claims_run_dir` around the task function
(also for in-process calls through diffctl.config.compose_config) and `ClaimRunDir`, a Hydra
callback (conf/*.yaml hydra.callbacks) that claims it before Hydra writes .hydra/ and the log file,
so a refused directory keeps even its old .hydra/config.yaml (which `sample resume=` reads).

A claim takes an exclusive flock on <dir>/.diffctl.lock (the holder's PID written in it), so a
second process is refused naming that PID; the kernel drops the lock however the holder ends, so
no stale-PID logic is needed. A directory counts as used when it holds any file besides what
Hydra writes when a run starts (.hydra/, <job>.log) and hidden files (the lock, the temporaries
of a killed run): a half-written checkpoint is nothing to keep, anything else is.
"""

from __future__ import annotations

import fcntl
import functools
import os
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from diffctl.errors import ConfigError

LOCK = ".diffctl.lock"
INDEX_JOBS = ("sample", "inpaint")  # resumable index jobs (diffctl.indexjob): resume=<run dir> continues in place
IN_PLACE = (*INDEX_JOBS, "distill", "reflow")  # commands whose resume=<run dir> continues in that directory
_held: dict[Path, int] = {}  # directory -> fd of its lock, held by this process
_pending: set[Path] = set()  # claimed by ClaimRunDir for the task about to start in this process


def _not_rank_zero() -> bool:
    """Ranks > 0 of torchrun, SLURM and Lightning's own DDP children (LOCAL_RANK) share rank 0's
    directory: rank 0, or the process that launched the others, holds it for all of them."""
    return any(int(os.environ.get(key, "0") or 0) > 0 for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID"))


def used_files(directory: Path, limit: int = 3) -> list[str]:
    """Up to `limit` files (relative names) that show `directory` already holds a run."""
    found: list[str] = []
    for root, dirs, files in os.walk(directory):
        top = Path(root) == directory
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .hydra/, .submitit/: Hydra's own
        for name in sorted(files):
            if name.startswith(".") or (top and name.endswith(".log")):
                continue
            found.append(str((Path(root) / name).relative_to(directory)))
            if len(found) == limit:
                return found
    return found


def _holder(fd: int) -> str:
    """The PID in a lock file someone else holds. It is written just after the flock is taken, so
    wait a moment for a number whose process exists (not the one of a finished earlier run)."""
    text = ""
    for _ in range(40):
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        if text.isdigit():
            try:
                os.kill(int(text), 0)
                break
            except PermissionError:
                break
            except OSError:
                pass
        time.sleep(0.05)
    return f"PID {text}" if text.isdigit() else "a PID not yet written"


def _resumes_in_place(directory: Path, command: str, resume: Any) -> bool:
    """`train resume=<dir> hydra.run.dir=<dir>`: continuing from the directory's own last.ckpt
    replaces nothing of it (an earlier step_*.ckpt would: its later checkpoints get rewritten)."""
    if command != "train" or not resume:
        return False
    last, path = directory / "checkpoints" / "last.ckpt", Path(str(resume)).expanduser()
    path = next((p for p in (path / "checkpoints" / "last.ckpt", path / "last.ckpt") if p.is_file()), path)
    return last.is_file() and path.is_file() and os.path.samefile(path, last)


def _refusal(directory: Path, command: str, found: list[str], key: str) -> str:
    shown = ", ".join(found)
    if command in INDEX_JOBS and any((directory / "partial").glob("*.npz")):
        return f"{directory} holds unfinished samples of an interrupted run; continue it with resume={directory}, or choose a new {key}"
    if command == "train" and (directory / "checkpoints" / "last.ckpt").is_file():
        return (f"{directory} already holds a training run ({shown}); nothing is overwritten: continue it with "
                f"`diffctl train resume={directory}` (it writes to a new directory), or choose a new {key}")
    return f"{directory} already holds a run ({shown}); nothing is overwritten: choose a new {key} (unset, every run gets its own)"


def claim(directory: str | Path, command: str, resume: Any = None, key: str = "hydra.run.dir", reuse: bool = False) -> None:
    """Lock `directory` for this process, refusing one another process holds or one already used
    (unless `reuse`: the run being resumed, or a SLURM job requeued into its own directory)."""
    directory = Path(directory).resolve()
    if _not_rank_zero() or directory in _held:
        return
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise ConfigError(f"{directory} is in use by another diffctl process ({holder}, see {LOCK}); "
                          f"wait for it to end, or choose another {key}") from None
    reuse = reuse or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0 or _resumes_in_place(directory, command, resume)
    found = [] if reuse else used_files(directory)
    if found:  # refused: the lock file is left as it was
        os.close(fd)
        raise ConfigError(_refusal(directory, command, found, key))
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[directory] = fd


def release(directory: str | Path) -> None:
    fd = _held.pop(Path(directory).resolve(), None)
    if fd is not None:
        os.close(fd)  # the file stays: unlinking it would let two processes lock two different files


def claims_run_dir(command: str):
    """Decorator of a command's task function: its run directory (and, for `sample`/`inpaint resume=`, the
    resumed run's, and `distill resume=`'s) is claimed for the call and released after it, so in-process callers
    (scripts, tests, a --multirun sweep's jobs) hold only the directory they are writing."""

    def decorate(task):
        @functools.wraps(task)
        def wrapper(cfg, *args, **kwargs):
            from hydra.core.hydra_config import HydraConfig

            dirs = [Path(HydraConfig.get().runtime.output_dir).resolve()]
            if command in IN_PLACE and cfg.get("resume") and Path(str(cfg.resume)).expanduser().is_dir():
                dirs.append(Path(str(cfg.resume)).expanduser().resolve())
            mine = []
            try:
                for i, d in enumerate(dirs):
                    if d in _pending:  # ClaimRunDir took it for this task just before Hydra wrote into it
                        _pending.discard(d)
                        mine.append(d)
                    elif d not in _held:  # (held, not pending: a task called from a task, which holds it)
                        claim(d, command, cfg.get("resume"), reuse=i > 0)
                        mine.append(d)
                return task(cfg, *args, **kwargs)
            finally:
                for d in mine:
                    release(d)

        return wrapper

    return decorate


class ClaimRunDir(Callback):
    """Claims the run (or sweep) directory before Hydra creates it and writes .hydra/ into it."""

    def on_run_start(self, config, **kwargs: Any) -> None:
        directory = Path(str(config.hydra.run.dir)).resolve()
        if directory not in _held:
            _refuse_or_claim(directory, config.hydra.job.config_name, config.get("resume"), "hydra.run.dir")
            _pending.add(directory)

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        _refuse_or_claim(Path(str(config.hydra.sweep.dir)), config.hydra.job.config_name, None, "hydra.sweep.dir")


def _refuse_or_claim(directory: Path, command: str, resume: Any, key: str) -> None:
    """Hydra turns a callback's exception into a warning and goes on, so the refusal exits here."""
    try:
        claim(directory, command, resume, key)
    except ConfigError as err:
        from diffctl.reporting import print_error

        print_error(err)
        sys.exit(1)
    except OSError:  # a directory that cannot be created: Hydra fails on it next and reports it (diffctl.reporting)
        pass
