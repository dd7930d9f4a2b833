"""Make torchvision importable on CPU-only torch.

PyPI's torchvision wheel is built against CUDA torch and registers fake kernels for
``torchvision::nms``/``qnms``, operators its compiled extension would define. On the
CPU torch wheel the extension does not load, so ``import torchvision`` (and with it
torchmetrics and lightning) raises. Defining the two operator schemas first makes
datasets, transforms and utils usable; detection ops stay unavailable, which we never use.
This only runs when the plain import fails.
"""

from __future__ import annotations

import sys

_shim_library = None  # keeps the torch.library.Library alive


def ensure_torchvision() -> None:
    global _shim_library
    try:
        import torchvision  # noqa: F401

        return
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _shim_library = torch.library.Library("torchvision", "DEF")
    _shim_library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _shim_library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401,F811
