"""Running one job in several processes, one per device: in this process (one device), inside the
process group of torchrun, or in worker processes started here (spawn). Plus the collectives the
jobs need (a sum, the device of a process).

`launch(trainer, work, args, stopped)` calls `work(fabric, *args)` in every process (fabric None
for one device) and returns rank 0's result. `work` and `args` go to the workers by pickling: a
module-level function and plain data (a config as a dict, paths as strings). A DiffctlError raised
by `work` in any process is raised in the caller as the same type and message, one line.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from diffctl.errors import DiffctlError


@dataclass
class _Failed:
    """A worker's DiffctlError, handed to the parent (the exception itself may not pickle)."""

    kind: type
    message: str


def launch(trainer: dict, work: Callable, args: tuple, stopped: Callable[[], str], what: str = "sampling", **local) -> Any:
    """Run `work(fabric, *args)` on trainer["devices"] processes; returns rank 0's result (other
    ranks of torchrun: their own). One device: in this process without Fabric, with **local passed
    too (objects already loaded there). stopped(): what was kept, and `what` the job, for the line
    that says a worker died."""
    if trainer["devices"] == 1:
        result = _guarded(work, None, args, local)
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun: join its processes
        result = _in_process_group(trainer, work, args)
    else:
        result = _spawn(trainer, work, args, stopped, what)
    if isinstance(result, _Failed):  # a worker's one-line error, raised here in the parent
        raise result.kind(result.message)
    return result


def device(fabric, accelerator: str) -> torch.device:
    """This process's device: Fabric's, else the one trainer.accelerator names (auto: cuda if any)."""
    if fabric is not None:
        return fabric.device
    if accelerator == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device("cuda" if accelerator == "gpu" else accelerator)


def sum_over_processes(fabric, value: int) -> int:
    if fabric is None or fabric.world_size == 1:
        return value
    return int(fabric.all_reduce(torch.tensor(value, device=fabric.device), reduce_op="sum").item())


def _guarded(work: Callable, fabric, args: tuple, local: dict) -> Any:
    try:
        return work(fabric, *args, **local)
    except DiffctlError as err:
        return _Failed(type(err), str(err))


def _fabric(trainer: dict):
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator=trainer["accelerator"], devices=trainer["devices"], strategy="ddp")
    fabric.launch()  # joins the process group; processes were started by torchrun or _spawn
    return fabric


def _in_process_group(trainer: dict, work: Callable, args: tuple) -> Any:
    """This process's share, inside the process group, which it leaves before returning: gloo's
    threads torn down at interpreter exit can abort a finished worker ("terminate called without an
    active exception", seen in CI)."""
    try:
        return _guarded(work, _fabric(trainer), args, {})
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _spawn(trainer: dict, work: Callable, args: tuple, stopped: Callable[[], str], what: str) -> Any:
    """Start one worker per device that runs only `work` (not the Hydra command line again).
    Our own entry point rather than Fabric's ddp_spawn, so each worker imports diffctl (and its
    torchvision shim) before Lightning."""
    import logging
    import socket

    import torch.multiprocessing as mp

    from diffctl.signals import deferred, stop_processes

    devices = trainer["devices"]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)  # "Terminating process ...": reported below
    context = None
    try:
        with deferred():  # a signal while starting is acted on once every started process can be stopped
            context = mp.start_processes(
                _worker, args=(devices, port, trainer, work, args, queue), nprocs=devices, start_method="spawn", join=False
            )
        while not context.join():  # torch stops the other workers when one fails
            pass
    except mp.ProcessExitedException as err:  # ended by a signal or an exit code, not by a Python error
        how = f"was stopped by {err.signal_name}" if err.signal_name else f"exited with code {err.exit_code}"
        raise DiffctlError(
            f"{what} process {err.error_index} (pid {err.error_pid}) {how}; the other processes were stopped; {stopped()}"
        ) from None
    finally:  # interrupted (SIGTERM/SIGINT of this process) or failed: no worker outlives the command
        if context is not None:
            stop_processes(context.processes)
    return queue.get()


def _worker(rank: int, world: int, port: int, trainer: dict, work: Callable, args: tuple, queue) -> None:
    from diffctl.signals import die_on_signals

    die_on_signals()  # SIGTERM/SIGINT end a worker at once (its writes are atomic); the parent reports it
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world), "NODE_RANK": "0"}
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    result = _in_process_group(trainer, work, args)
    if rank == 0:
        queue.put(result)
