import diffctl  # noqa: F401  (installs the CPU torchvision shim before anything imports torchvision)
