"""The bad-input catalogue (issue 5): each case runs the real CLI and asserts what the user sees:
a short message saying what was wrong and what to do, a non-zero exit, no traceback (unless
HYDRA_FULL_ERROR=1), and nothing written before left damaged. Faults a test machine cannot produce
(out of memory, a full disk) are planted in the real CLI's processes by a sitecustomize hook."""

import hashlib
import json
import os
import re
import shlex
import textwrap

import numpy as np
import pytest
import torch
from helpers import run_cli, run_sample, tiny_overrides

from diffctl.checkpoint import load_checkpoint

GMM = ["model=gmm", "num_samples=4", "steps=2", "progress_bar=false"]
# What Lightning itself logs to stderr when a Trainer starts or restores a checkpoint, and when several
# processes start (and torch.multiprocessing ends the others after one failed): not part of the
# error, so not counted against its one line.
STARTUP_INFO = re.compile(
    r"(INFO: )?(GPU available:|TPU available:|HPU available:|\N{ELECTRIC LIGHT BULB} Tip:|Restoring states from the checkpoint path|"
    r"Initializing distributed: |-{20,}$|distributed_backend=|All distributed processes registered)|"
    r"W\d{4} .*Terminating process \d+ via signal"
)


def _assert_user_error(out, *fragments, code=1, max_lines=1):
    assert out.returncode == code, (out.returncode, out.stdout[-2000:], out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines()
             if line.strip() and not STARTUP_INFO.match(line)]
    assert 1 <= len(lines) <= max_lines, out.stderr
    for fragment in fragments:
        assert fragment in out.stderr, (fragment, out.stderr)


CASES = {
    # config groups and keys: Hydra's own errors, condensed by the CLI to one line
    "unknown group choice lists the valid ones": (["train", "model=resnet"], ["model=resnet", "choose one of: ", "dit", "unet_cifar"]),
    "misspelled key": (["train", "trainer.max_stepz=3"], ["trainer.max_stepz: no such config key", "diffctl train --cfg job",
                                                          "+trainer.max_stepz=3"]),
    "a training group given to sample": (["sample", *GMM, "condition=sr"], ["condition= is chosen when training", "drop condition="]),
    # ranges and types
    "negative steps": (["sample", *GMM, "steps=-1"], ["steps must be a positive integer"]),
    "num_samples=0": (["sample", *GMM, "num_samples=0"], ["num_samples must be a positive integer"]),
    "eta outside [0, 1]": (["sample", *GMM, "sampler=ddim", "sampler.eta=1.5"], ["sampler.eta must be in [0, 1]"]),
    "unknown sampler option": (["sample", *GMM, "sampler=ddpm", "+sampler.snr=0.1"], ["has no option snr"]),
    "unknown spacing": (["sample", *GMM, "sampler=ode", "sampler.spacing=cosine"], ["sampler.spacing must be one of"]),
    "more devices than samples": (["sample", *GMM, "trainer.devices=8"], ["more than num_samples"]),
    "negative guidance": (["sample", *GMM, "guidance=-1"], ["guidance must be >= 0"]),
    # combinations that cannot work
    "consistency sampler on a diffusion model": (["sample", *GMM, "sampler=consistency"], ["consistency"]),
    "guidance on an unconditional model": (["sample", *GMM, "guidance=3"], ["guidance needs a class-conditional model"]),
    "class label out of range": (["sample", *GMM, "model.conditional=true", "class_label=9"], ["class_label must be in [0, 3]"]),
    "training the analytic model": (["train", "model=gmm"], ["nothing to train"]),
    "leading spacing with too many steps": (["sample", *GMM, "sampler=ddim", "sampler.spacing=leading", "steps=2000"],
                                            ["allows at most 1000 steps"]),
    # missing things
    "checkpoint that does not exist": (["sample", "ckpt=/nonexistent/run.ckpt", "progress_bar=false"], ["checkpoint not found"]),
    "mixture file that does not exist": (["sample", *GMM, "model.file=/nonexistent/mix.yaml"], ["model.file not found"]),
    "likelihood with an unknown trace": (["likelihood", "model=gmm", "num_batches=1", "trace=exactly"], ["trace must be one of"]),
    "unknown command": (["smaple"], ["unknown command 'smaple'"], 2, 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_no_traceback(case, tmp_path):
    args, fragments, *rest = CASES[case]
    code, max_lines = rest if rest else (1, 1)
    _assert_user_error(run_cli(args, tmp_path), *fragments, code=code, max_lines=max_lines)


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_truncated_checkpoint_is_refused_and_left_as_it_was(tmp_path):
    ckpt = tmp_path / "half.ckpt"
    torch.save({"state_dict": {"ema.w": torch.zeros(1000)}, "hyper_parameters": {"config": {}}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:300])
    before = _digest(ckpt)
    _assert_user_error(run_cli(["sample", f"ckpt={ckpt}", "progress_bar=false"], tmp_path), "truncated or not a PyTorch checkpoint")
    assert _digest(ckpt) == before


def test_checkpoint_from_another_tool_is_refused(tmp_path):
    ckpt = tmp_path / "other.pt"
    torch.save({"model": {"w": torch.zeros(3)}}, ckpt)  # e.g. a plain state dict from another trainer
    _assert_user_error(run_cli(["sample", f"ckpt={ckpt}", "progress_bar=false"], tmp_path), "is not a diffctl training checkpoint")


@pytest.mark.parametrize("args, shown", [
    (["sample", *GMM, "steps=-1"], "steps must be a positive integer"),
    (["train", "model=resnet"], "Available options in 'model'"),  # Hydra's own error, in full
])
def test_full_error_env_shows_the_traceback(tmp_path, args, shown):
    import subprocess
    import sys

    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    out = subprocess.run([sys.executable, "-m", "diffctl", *args], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "Traceback" in out.stderr and shown in out.stderr


# ---------------------------------------------------------------- faults injected into a real run

def _run_with_hook(hook: str, args, tmp_path):
    """The real CLI with `hook` run at start-up of every Python process it starts (a sitecustomize
    module on PYTHONPATH; spawned sampling workers run it too): the hook plants the fault."""
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir(exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(textwrap.dedent(hook))
    path = os.pathsep.join(p for p in (str(hook_dir), os.environ.get("PYTHONPATH")) if p)
    return run_cli(args, tmp_path, env={"PYTHONPATH": path})


# The network's forward raises what CUDA raises when an allocation fails; CPU memory never runs out
# in a test. Batches of size OOM_AT_BATCH (any size if None) fail.
OOM_HOOK = """
    import diffctl  # its torchvision shim first
    import torch
    from diffctl.networks.unet import UNet

    OOM_AT_BATCH = {batch}
    forward = UNet.forward

    def out_of_memory(self, x, *args, **kwargs):
        if OOM_AT_BATCH is None or x.shape[0] == OOM_AT_BATCH:
            raise torch.OutOfMemoryError(
                "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
                "1.06 GiB is free. Including non-PyTorch memory, this process has 78.12 GiB memory in use.")
        return forward(self, x, *args, **kwargs)

    UNet.forward = out_of_memory
"""


def _suggested_command(stderr: str) -> list[str]:
    """The `diffctl <command> ...` an error message tells the user to run, as run_cli arguments."""
    found = re.search(r"`diffctl ([^`]+)`", stderr)
    assert found, stderr
    return shlex.split(found[1])


def test_out_of_memory_while_sampling_names_the_batch_size_and_resume_keeps_the_finished_batch(trained, tmp_path):
    _, run_dir = trained
    out_dir = tmp_path / "run"
    # 6 samples in batches of 4: the first batch is made and saved, the second (2 samples) runs out of memory
    args = ["sample", f"ckpt={run_dir}", "sampler=ddpm", "steps=2", "num_samples=6", "batch_size=4",
            "metrics.names=[]", "progress_bar=false", f"hydra.run.dir={out_dir}"]
    out = _run_with_hook(OOM_HOOK.format(batch=2), args, tmp_path)
    _assert_user_error(out, "out of memory sampling with batch_size=4", "CUDA out of memory. Tried to allocate 2.00 GiB",
                       f"diffctl sample resume={out_dir} batch_size=2")
    shards = list((out_dir / "partial").glob("shard-*.npz"))
    assert len(shards) == 1, shards  # the first batch, saved before the failure
    with np.load(shards[0]) as shard:
        first_batch = shard["samples"]
    # what the message says to do works, and reuses the batch made before the failure
    resumed = run_cli(_suggested_command(out.stderr), tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    samples = np.load(out_dir / "samples.npz")["samples"]
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert samples.shape[0] == 6 and metrics["resumed_samples"] == 4
    np.testing.assert_array_equal(samples[:4], first_batch)


def test_out_of_memory_in_sampling_worker_processes_is_one_line_too(trained, tmp_path):
    _, run_dir = trained
    args = ["sample", f"ckpt={run_dir}", "sampler=ddpm", "steps=2", "num_samples=4", "batch_size=2", "trainer.accelerator=cpu",
            "trainer.devices=2", "metrics.names=[]", "progress_bar=false", f"hydra.run.dir={tmp_path / 'run'}"]
    out = _run_with_hook(OOM_HOOK.format(batch=None), args, tmp_path)
    _assert_user_error(out, "out of memory sampling with batch_size=2", "CUDA out of memory", "batch_size=1")


def test_out_of_memory_while_scoring_keeps_the_samples_and_names_the_metrics_batch(trained, tmp_path):
    _, run_dir = trained
    out_dir = tmp_path / "run"
    hook = """
        import diffctl, torch
        import diffctl.metrics

        def evaluate(*args, **kwargs):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has a total capacity of 8 GiB")

        diffctl.metrics.evaluate = evaluate
    """
    args = ["sample", f"ckpt={run_dir}", "sampler=ddpm", "steps=2", "num_samples=3", "batch_size=3", "metrics.names=[fid]",
            "metrics.batch_size=64", "progress_bar=false", f"hydra.run.dir={out_dir}"]
    out = _run_with_hook(hook, args, tmp_path)
    _assert_user_error(out, "out of memory computing metrics with metrics.batch_size=64", f"the samples are saved in {out_dir}",
                       f"diffctl sample resume={out_dir} metrics.batch_size=32")
    assert np.load(out_dir / "samples.npz")["samples"].shape[0] == 3


def test_out_of_memory_while_training_names_the_batch_size(tmp_path):
    args = ["train", *tiny_overrides("unet"), f"hydra.run.dir={tmp_path / 'run'}"]
    out = _run_with_hook(OOM_HOOK.format(batch=None), args, tmp_path)
    _assert_user_error(out, "out of memory training with data.batch_size=16", "data.batch_size=8 trainer.accumulate_grad_batches=2")


def test_disk_full_while_saving_a_checkpoint_keeps_the_last_one_and_resume_continues(tmp_path):
    run_dir = tmp_path / "run"
    # The first checkpoint is written normally; writing the second fills the disk after 4 KiB.
    hook = """
        import builtins, errno, io, os
        import diffctl.files

        saves = [0]

        class FullDisk(io.FileIO):
            def write(self, data):
                if self.tell() + len(data) > 4096:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.name)
                return super().write(data)

        def open_(path, mode="r", *args, **kwargs):
            if str(path).endswith(".tmp") and ".ckpt." in str(path):
                saves[0] += 1
                if saves[0] >= 2:
                    return FullDisk(path, mode)
            return builtins.open(path, mode, *args, **kwargs)

        diffctl.files.open = open_  # the module's own name for open: only atomic writes see it (.ckpt. ones here)
    """
    args = ["train", *tiny_overrides("unet"), "checkpoint.every_n_steps=1", f"hydra.run.dir={run_dir}"]
    out = _run_with_hook(hook, args, tmp_path)
    ckpts = run_dir / "checkpoints"
    _assert_user_error(out, f"no space left on device while saving {ckpts / 'step_0000002.ckpt'}",
                       f"{ckpts / 'last.ckpt'} (step 1) is intact", f"free space and resume with `diffctl train resume={run_dir}`")
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step_0000001.ckpt"]  # no temporary left behind
    assert _digest(ckpts / "last.ckpt") == _digest(ckpts / "step_0000001.ckpt")
    assert load_checkpoint(ckpts / "last.ckpt")["global_step"] == 1
    # with space again, the suggested command continues the run to its end
    resumed = run_cli([*_suggested_command(out.stderr), "trainer.max_steps=3", f"hydra.run.dir={tmp_path / 'resumed'}"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["global_step"] == 3


# ---------------------------------------------------------------- where outputs go

@pytest.mark.parametrize("kind", ["under a regular file", "read-only directory"])
def test_unwritable_output_directory_names_it_and_the_key(tmp_path, kind):
    if kind == "under a regular file":  # fails for root too
        blocker = tmp_path / "notes.txt"
        blocker.write_text("keep me\n")
        target = blocker / "run"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories; the regular-file case covers root")
        blocker = tmp_path / "locked"
        blocker.mkdir()
        blocker.chmod(0o500)
        target = blocker / "run"
    try:
        out = run_cli(["sample", *GMM, f"hydra.run.dir={target}"], tmp_path)
    finally:
        if blocker.is_dir():
            blocker.chmod(0o700)
    _assert_user_error(out, "cannot create or write the run directory", str(target), "hydra.run.dir=<dir>")
    if blocker.is_file():
        assert blocker.read_text() == "keep me\n"


# ---------------------------------------------------------------- data and network that cannot work

def _empty(root):
    root.mkdir()


def _only_other_files(root):
    root.mkdir()
    (root / "README.txt").write_text("no images here")
    (root / "labels.csv").write_text("a,1\n")


DATA_CASES = {
    "empty image folder": (["data=imagefolder"], _empty, ["imagefolder root", "is empty", "put images in it"]),
    "image folder without images": (["data=imagefolder"], _only_other_files, ["imagefolder root", "contains no image files",
                                                                              "supported: .jpg"]),
    "MNIST missing offline": (["data=mnist", "data.download=false"], _empty,
                              ["mnist files not found under", "train-images-idx3-ubyte", "data.download=true", "data.root="]),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_dataset_that_is_not_there_names_the_root_and_what_it_expects(tmp_path, case):
    overrides, make, fragments = DATA_CASES[case]
    root = tmp_path / "data"
    make(root)
    run_dir = tmp_path / "run"
    out = run_cli(["train", *tiny_overrides("unet"), *overrides, f"data.root={root}", f"hydra.run.dir={run_dir}"], tmp_path)
    _assert_user_error(out, f"'{root}'", *fragments)
    assert not (run_dir / "checkpoints").exists()  # stopped before any training


NET_CASES = {
    "DiT patch size not dividing the resolution": (["model=dit", "model.patch_size=3"],
                                                    ["DiT resolution 8 is not divisible by patch_size 3"]),
    "U-Net with more levels than the resolution halves": (["model=unet", "model.channel_mult=[1,2,2,2,2]"],
                                                           ["UNet resolution 8 is not divisible by 2**(len(channel_mult)-1)=16",
                                                            "model.channel_mult"]),
}


@pytest.mark.parametrize("case", list(NET_CASES))
def test_resolution_the_network_cannot_take_stops_before_training(tmp_path, case):
    overrides, fragments = NET_CASES[case]
    model = overrides[0].split("=")[1]
    run_dir = tmp_path / "run"
    out = run_cli(["train", *tiny_overrides(model), *overrides[1:], f"hydra.run.dir={run_dir}"], tmp_path)
    _assert_user_error(out, *fragments)
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "samples").exists()


# ---------------------------------------------------------------- checkpoints that do not fit

@pytest.mark.parametrize("command", ["sample", "train resume"])
def test_checkpoint_with_a_mismatched_shape_names_the_tensor_and_both_shapes(trained, tmp_path, command):
    _, run_dir = trained
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    state = ckpt["state_dict"]
    name = next(k[len("ema."):] for k, v in state.items() if k.startswith("ema.") and v.ndim == 4 and "conv_in" not in k)
    good = list(state[f"ema.{name}"].shape)
    for prefix in ("ema.", "denoiser."):  # as if the file were written for a wider network
        state[prefix + name] = torch.zeros(good[0] + 1, *good[1:])
    bad = tmp_path / "wider.ckpt"
    torch.save(ckpt, bad)
    before = _digest(bad)
    wrong = str([good[0] + 1, *good[1:]])
    if command == "sample":
        out = run_cli(["sample", f"ckpt={bad}", "metrics.names=[]", "progress_bar=false", f"hydra.run.dir={tmp_path / 'out'}"], tmp_path)
        _assert_user_error(out, f"do not fit the network in its config: {name} is {wrong} in the file but {good} in the network")
    else:
        out = run_cli(["train", f"resume={bad}", "trainer=cpu", "logger=none", "progress_bar=false",
                       f"hydra.run.dir={tmp_path / 'out'}"], tmp_path)
        _assert_user_error(out, f"resume={bad}", f"denoiser.{name} is {wrong} in the file but {good} in the network")
    assert _digest(bad) == before


# ---------------------------------------------------------------- allowed, and exact

def test_num_samples_not_a_multiple_of_batch_and_devices_gives_exactly_num_samples(tmp_path):
    # 7 samples, batches of 3, 2 processes: the processes get 4 and 3, in batches 3+1 and 3
    args = ["model=gmm", "steps=2", "seed=5", "progress_bar=false", "num_samples=7"]
    split = run_cli(["sample", *args, "batch_size=3", "trainer.accelerator=cpu", "trainer.devices=2",
                     f"hydra.run.dir={tmp_path / 'split'}"], tmp_path)
    assert split.returncode == 0, split.stderr[-3000:]
    samples = np.load(tmp_path / "split" / "samples.npz")["samples"]
    assert samples.shape[0] == 7 and json.loads((tmp_path / "split" / "metrics.json").read_text())["num_samples"] == 7
    run_sample(tmp_path / "whole", [*args, "batch_size=7"])  # one batch, in this process: the reference
    np.testing.assert_array_equal(samples, np.load(tmp_path / "whole" / "samples.npz")["samples"])  # none lost or repeated
