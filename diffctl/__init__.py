"""diffctl: config-driven diffusion-model training and sampling."""

from diffctl._compat import ensure_torchvision

ensure_torchvision()

__version__ = "0.1.0"
