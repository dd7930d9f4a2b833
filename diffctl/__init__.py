"""diffctl: config-driven diffusion-model training and sampling."""

from diffctl._compat import install_torchvision_shim

# Cheap: torch and torchvision are imported by whatever needs them, through the shim (diffctl._compat).
install_torchvision_shim()

__version__ = "0.1.0"
