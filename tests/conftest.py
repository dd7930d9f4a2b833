import diffctl  # noqa: F401  (installs the CPU torchvision shim before anything imports torchvision)

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny U-Net trained for 2 steps, once per test module: (root, run dir); the run lies under
    root/outputs/train/ so commands run in root find it as the newest checkpoint."""
    from helpers import run_train, tiny_overrides

    root = tmp_path_factory.mktemp("trained")
    run_dir = root / "outputs" / "train" / "run"
    run_train(run_dir, [*tiny_overrides("unet"), "trainer.max_steps=2"])
    return root, run_dir
