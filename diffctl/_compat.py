"""Make torchvision importable on CPU-only torch, without importing it before it is needed.

PyPI's torchvision wheel is built against CUDA torch and registers fake kernels for
``torchvision::nms``/``qnms``, operators its compiled extension would define. On the
CPU torch wheel the extension does not load, so ``import torchvision`` (and with it
torchmetrics and lightning) raises. Defining the two operator schemas first makes
datasets, transforms and utils usable; detection ops stay unavailable, which we never use.
This only happens when the plain import fails.

``import diffctl`` only installs an import hook (a few microseconds): the first import of
torchvision, by diffctl, Lightning, torchmetrics or anyone else, runs through it. Importing
torch and torchvision eagerly here would cost every command, `diffctl --help` included, seconds.
"""

from __future__ import annotations

import importlib.abc
import sys

_shim_library = None  # keeps the torch.library.Library alive


def shim_applied() -> bool:
    """Whether the operator schemas had to be defined for torchvision to import."""
    return _shim_library is not None


def _define_schemas() -> None:
    global _shim_library
    import torch

    _shim_library = torch.library.Library("torchvision", "DEF")
    _shim_library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _shim_library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


class _ShimLoader(importlib.abc.Loader):
    """torchvision's own loader; when executing the package fails on the missing operators, the
    schemas are defined and the package executed again in the same module object (as
    importlib.reload does), its half-imported submodules dropped first."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        try:
            try:
                self.loader.exec_module(module)
            except RuntimeError as err:
                if "torchvision::nms" not in str(err) or shim_applied():
                    raise
                for name in [m for m in sys.modules if m.startswith("torchvision.")]:
                    del sys.modules[name]
                _define_schemas()
                self.loader.exec_module(module)
        finally:  # from here on the module looks as a plain import leaves it
            module.__loader__ = self.loader
            if getattr(module, "__spec__", None) is not None:
                module.__spec__.loader = self.loader


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    """Finds torchvision with the finders after it and hands its spec back with _ShimLoader."""

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        for finder in sys.meta_path[sys.meta_path.index(self) + 1 :]:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ShimLoader(spec.loader)
                return spec
        return None


def install_torchvision_shim() -> None:
    """Apply the shim to the first import of torchvision, whenever that happens (idempotent)."""
    if "torchvision" in sys.modules or any(isinstance(f, _TorchvisionFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TorchvisionFinder())
