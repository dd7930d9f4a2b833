"""LPIPS (Zhang et al. 2018) with its backbone weights read from a local file, never downloaded.

The network is torchmetrics' LPIPS module (the paper's v0.1 linear layers ship inside torchmetrics);
torchmetrics would download the torchvision backbone (alexnet, vgg16 or squeezenet1_1) on first use,
which fails offline and hides which file was used. So the backbone is built untrained and its weights
are loaded from the file the user names: torchvision's own release file (e.g. alexnet-owt-7be5be79.pth,
vgg16-397923af.pth, squeezenet1_1-b8a52dc0.pth from download.pytorch.org), a state dict with the same
`features.*` keys, or the same as .safetensors. Which backbone it is comes from the file's keys and
shapes. Files load with torch.load(weights_only=True).

Images are [-1, 1] NCHW (gray is repeated to 3 channels). LPIPS was calibrated on 64 x 64 patches and
AlexNet needs at least 63 pixels a side, so images are resized to `resize` (64 by default; bilinear up,
area down, as torchmetrics and torch-fidelity) before the backbone; resize=None keeps their size.
`distance(a, b)` is the paper's score (each layer's map averaged over space, summed over layers);
`distance(a, b, region)` averages the spatial map (each layer's map upsampled to the image size,
summed) over the pixels where region is 1 instead, for scores of an inpainted hole.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from diffctl.errors import ConfigError

# torchmetrics' name for each backbone, and what identifies the backbone's state dict
BACKBONES = {"alexnet": "alex", "vgg16": "vgg", "squeezenet1_1": "squeeze"}
EXAMPLE_FILES = "alexnet-owt-7be5be79.pth, vgg16-397923af.pth or squeezenet1_1-b8a52dc0.pth from download.pytorch.org"


def _read_state_dict(path: Path, key: str) -> dict[str, Tensor]:
    if not path.is_file():
        raise ConfigError(f"{key}={path}: no such file (give the torchvision backbone weights, e.g. {EXAMPLE_FILES})")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or foreign file: one line, whatever the loader raised
        raise ConfigError(f"{key}={path}: not a readable weights file ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError(f"{key}={path}: not a state dict of tensors (give the torchvision backbone weights, e.g. {EXAMPLE_FILES})")
    return {k: v for k, v in state.items() if k.startswith("features.")}  # a whole model's file: the classifier is unused


def backbone_of(state: dict[str, Tensor]) -> str | None:
    """'alexnet', 'vgg16' or 'squeezenet1_1' from a torchvision state dict's feature keys, else None."""
    first = state.get("features.0.weight")
    if first is None:
        return None
    if tuple(first.shape) == (64, 3, 11, 11):
        return "alexnet"
    if tuple(first.shape) != (64, 3, 3, 3) or any("running_mean" in k for k in state):  # batch-norm variants
        return None
    if "features.3.squeeze.weight" in state:
        return "squeezenet1_1"
    if "features.28.weight" in state and "features.30.weight" not in state:  # vgg19 has convolutions up to 34
        return "vgg16"
    return None


class LPIPS(torch.nn.Module):
    """LPIPS with its backbone weights from `path` (see the module doc); eval mode, no parameter gradients
    (gradients still flow to the images, for use as a loss)."""

    def __init__(self, path: str | Path, resize: int | None = 64, key: str = "lpips"):
        super().__init__()
        from torchmetrics.functional.image.lpips import _LPIPS  # the paper's network; public wrappers download

        path = Path(path).expanduser()
        state = _read_state_dict(path, key)
        name = backbone_of(state)
        if name is None:
            raise ConfigError(f"{key}={path}: not the weights of a torchvision alexnet, vgg16 or squeezenet1_1 (e.g. {EXAMPLE_FILES})")
        self.backbone, self.path, self.resize, self.key = name, path, resize, key
        self.net = _LPIPS(pretrained=True, net=BACKBONES[name], pnet_rand=True, resize=resize, eval_mode=True)
        # torchmetrics' backbone slices keep torchvision's layer numbers: slice2.3.weight is features.3.weight
        names = {k: "features." + re.sub(r"^(slice\d+|slices\.\d+)\.", "", k) for k in self.net.net.state_dict()}
        missing = sorted(set(names.values()) - set(state))
        if missing:
            raise ConfigError(f"{key}={path}: a {name} state dict without {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        try:
            self.net.net.load_state_dict({k: state[v] for k, v in names.items()}, strict=True)
        except RuntimeError as e:  # shapes that do not fit the backbone
            raise ConfigError(f"{key}={path}: does not fit {name} ({str(e).splitlines()[-1].strip()[:160]})") from None
        self.requires_grad_(False)
        self.eval()

    def check_size(self, height: int, width: int) -> None:
        """ConfigError now if images of this size cannot go through the backbone (only with resize=None)."""
        if self.resize is not None:
            return
        try:
            with torch.no_grad():
                self.net.net(torch.zeros(1, 3, height, width))
        except RuntimeError:
            raise ConfigError(f"{self.key}_resize=null: {height}x{width} images are too small for LPIPS's {self.backbone}; "
                              f"set {self.key}_resize=64") from None  # fmt: skip

    def forward(self, a: Tensor, b: Tensor, region: Tensor | None = None) -> Tensor:
        """Per-image distance [N] between images a and b ([-1, 1], NCHW, 1 or 3 channels); with region
        ([N, 1, H, W] or broadcastable, 1 = counted) the spatial map's mean over the region (0 where empty)."""
        if a.shape[1] == 1:
            a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
        self.net.spatial = region is not None
        d = self.net(a, b)
        if region is None:
            return d.flatten()
        weight = region.to(d).expand_as(d)
        return (d * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1)

    @torch.no_grad()
    def scores(self, a: Tensor, b: Tensor, region: Tensor | None = None, batch: int = 64) -> Tensor:
        """forward in batches, without gradients: per-image distances [N]."""
        device = next(self.parameters()).device
        parts = []
        for i in range(0, a.shape[0], batch):
            r = None if region is None else region[i : i + batch].to(device)
            parts.append(self(a[i : i + batch].to(device), b[i : i + batch].to(device), r).cpu())
        return torch.cat(parts) if parts else torch.zeros(0)


NOT_COMPUTED = "LPIPS not computed: give lpips=<torchvision alexnet/vgg16/squeezenet1_1 weights file> (nothing is downloaded)"


def from_config(cfg, height: int, width: int) -> LPIPS | None:
    """The LPIPS a command's `lpips` / `lpips_resize` keys ask for, checked against its images' size
    before any work; None without lpips= (the metrics then carry NOT_COMPUTED as their note)."""
    if not cfg.get("lpips"):
        return None
    lpips = LPIPS(cfg.lpips, cfg.get("lpips_resize", 64))
    lpips.check_size(height, width)
    return lpips
