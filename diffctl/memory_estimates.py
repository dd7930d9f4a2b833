"""Bytes a network pass and the data pipeline take, measured before anything large is allocated
(diffctl/memory.py compares them with what the machine has).

Network activations: the network runs once on the meta device (shapes only, no data, no
arithmetic) under a dispatch mode that adds up the bytes of every op output while it is alive
(keyed by storage, so views cost nothing; freed when the storage is) and keeps the peak. With a
backward pass this is what autograd keeps for backward plus the gradients, as an allocator would
see it, without fragmentation or library workspaces: real use is higher, never much lower
(tests/test_bad_inputs_signals.py measures it against a real process). Data: the batches a
DataLoader holds (float32, a list and the stacked batch) and the decoded images of the items in flight.
"""

from __future__ import annotations

import math
import weakref
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode  # its documented home (torch.utils._python_dispatch)


class _LiveBytes(TorchDispatchMode):
    """Peak bytes of op outputs alive at the same time."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):  # aten ops return a tensor or a flat tuple/list
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self._sizes:
                    self._sizes[key] = storage.nbytes()
                    self.live += self._sizes[key]
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)


def on_meta(net: torch.nn.Module) -> Callable:
    """net's forward with meta stand-ins for its parameters and buffers (nothing is copied)."""
    from torch.func import functional_call

    state = {k: torch.empty_like(v, device="meta").requires_grad_(v.requires_grad) for k, v in net.named_parameters()}
    state.update({k: torch.empty_like(v, device="meta") for k, v in net.named_buffers()})
    return lambda *args: functional_call(net, state, args, strict=False)


def network_bytes(net: torch.nn.Module | Callable, batch: int, shape, num_classes: int, grad: str | None) -> int | None:
    """Peak activation bytes of one forward of `net` (a module, or a forward already on meta) at
    `batch` samples of `shape` [C, H, W]; grad: None (inference), "params" (training: backward into
    the parameters) or "input" (a vector-Jacobian product with respect to the input, as likelihood
    does). None when the network cannot run on the meta device (then nothing is refused)."""
    forward = on_meta(net) if isinstance(net, torch.nn.Module) else net
    try:
        x = torch.empty((batch, *shape), device="meta", requires_grad=grad == "input")
        t = torch.empty((batch,), device="meta")
        labels = torch.zeros((batch,), dtype=torch.long, device="meta") if num_classes else None
        mode = _LiveBytes()
        with mode, torch.set_grad_enabled(grad is not None):
            out = forward(x, t, labels)
            if grad == "params":
                out.float().square().mean().backward()
            elif grad == "input":
                torch.autograd.grad(out.sum(), x)
        return mode.peak
    except Exception:  # an op without a meta kernel, data-dependent control flow: no estimate
        return None


def batch_bytes(batch: int, shape, workers: int = 0) -> int:
    """Host memory of the data pipeline: batches in flight (each worker prefetches 2, plus the one
    in use; float32, as a list of items and as the stacked batch) and each item's decoded pixels
    (uint8: the resized image and its array copy)."""
    per_item = math.prod(shape) * (4 * 2 + 2)
    return (2 * max(workers, 0) + 1) * batch * per_item
