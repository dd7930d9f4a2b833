import diffctl  # noqa: F401  (installs the CPU torchvision shim before anything imports torchvision)

import os  # noqa: E402

import pytest  # noqa: E402


def pytest_configure(config):
    """Under pytest-xdist (`-n`), each worker gets its share of the cores: N workers that each let torch
    (and every process a test starts, through OMP_NUM_THREADS) use all the cores oversubscribe them N times
    over, and the tiny networks of these tests then spend their time in thread hand-offs. Serially the
    defaults stay as they are."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny U-Net trained for 2 steps, once per test module: (root, run dir); the run lies under
    root/outputs/train/ so commands run in root find it as the newest checkpoint."""
    from helpers import tiny_trained_run

    root = tmp_path_factory.mktemp("trained")
    return root, tiny_trained_run(tmp_path_factory, root / "outputs" / "train" / "run")
