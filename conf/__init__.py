# Makes conf/ importable as the package `diffctl.conf` (see pyproject.toml), so the Hydra
# config tree ships inside the wheel and is found from any install.
