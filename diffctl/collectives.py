"""The torch.distributed collectives the metrics use, each a no-op on one process: rank 0 does a
step and every rank learns its result (or its error), and rows gathered in rank order.
(diffctl.launch has the Fabric side: starting the processes, a sum.)"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from diffctl.detectors import MetricsUnavailable
from diffctl.errors import ConfigError


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def process_rank() -> int:
    return dist.get_rank() if distributed() else 0


def comm_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast(obj, device: torch.device):
    if not distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=comm_device(device))
    return box[0]


def on_rank0(fn, device: torch.device):
    """fn() on rank 0 only (None elsewhere); an error there is raised on every rank, so none waits forever."""
    if not distributed():
        return fn()
    result, err = None, None
    if process_rank() == 0:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001  (re-raised below, on every rank)
            err = e
    message = broadcast(None if err is None else (isinstance(err, ConfigError), str(err)), device)
    if err is not None:
        raise err
    if message is not None:
        raise (ConfigError if message[0] else MetricsUnavailable)(f"rank 0: {message[1]}")
    return result


def gather_rows(x: Tensor | None, device: torch.device) -> Tensor | None:
    """Every rank's rows concatenated in rank order (row counts may differ between ranks)."""
    if x is None or not distributed():
        return x
    comm = comm_device(device)
    count = torch.tensor([len(x)], device=comm)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    buf = x.new_zeros((max(counts), *x.shape[1:]), device=comm)
    buf[: len(x)] = x.to(comm)
    parts = [torch.empty_like(buf) for _ in counts]
    dist.all_gather(parts, buf)
    return torch.cat([p[:c] for p, c in zip(parts, counts)]).cpu()
