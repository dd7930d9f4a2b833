"""Files from someone else never run code: a real malicious pickle is refused by every command that
loads checkpoints or weights, a stored config may only instantiate diffctl classes, and no module of
the package unpickles anything unchecked."""

import pathlib
import re

import pytest
import torch
from helpers import run_cli, tiny_overrides

from diffctl.errors import CheckpointError

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "diffctl"


class _Payload:
    """Unpickling this calls pathlib.Path.touch(marker): what an attacker's code would do."""

    def __init__(self, marker):
        self.marker = pathlib.Path(marker)

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def _evil_checkpoint(path, marker):
    """Looks like a diffctl checkpoint (state_dict, config) with a payload inside."""
    torch.save({"state_dict": {"ema.w": torch.zeros(1)}, "hyper_parameters": {"config": {"seed": 0}},
                "callbacks": {"x": _Payload(marker)}}, path)
    return path


@pytest.fixture
def evil(tmp_path):
    # the payload is real: loading a copy the unsafe way creates its marker
    probe = tmp_path / "probe_marker"
    torch.load(_evil_checkpoint(tmp_path / "probe.ckpt", probe), weights_only=False)
    assert probe.exists()
    marker = tmp_path / "PWNED"
    return _evil_checkpoint(tmp_path / "evil.ckpt", marker), marker


@pytest.mark.parametrize(
    "command",
    [
        ["sample", "ckpt={ckpt}", "metrics.names=[]"],
        ["train", "resume={ckpt}", *tiny_overrides("unet")],
        ["likelihood", "ckpt={ckpt}"],
        ["export", "ckpt={ckpt}"],
    ],
    ids=lambda c: c[0],
)
def test_malicious_pickle_is_refused_by_every_command(evil, tmp_path, command):
    ckpt, marker = evil
    args = [a.format(ckpt=ckpt) for a in command]
    result = run_cli([*args, f"hydra.run.dir={tmp_path / 'out'}"], tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"refusing to load {ckpt}" in result.stderr and "could run code" in result.stderr
    assert not marker.exists()


def test_malicious_inception_weights_are_refused(evil):
    from diffctl.detectors import MetricsUnavailable, _load_inception

    ckpt, marker = evil
    with pytest.raises(MetricsUnavailable, match="not a plain-tensor state dict"):
        _load_inception(ckpt)
    assert not marker.exists()


def test_stored_config_may_only_instantiate_diffctl_classes(tmp_path):
    """weights_only guards the pickle, but a stored config's _target_ is called on load as well."""
    from hydra.utils import instantiate

    from diffctl.build import load_denoiser

    node = {"_target_": "os.makedirs", "_args_": [str(tmp_path / "probe_dir")]}
    instantiate(node)  # the payload is real
    assert (tmp_path / "probe_dir").is_dir()
    marker = tmp_path / "PWNED"
    config = {"sde": {"_target_": "os.makedirs", "_args_": [str(marker)]}, "model": {"_target_": "diffctl.networks.UNet"}}
    torch.save({"state_dict": {"ema.w": torch.zeros(1)}, "hyper_parameters": {"config": config}}, tmp_path / "c.ckpt")
    with pytest.raises(CheckpointError, match=r"sde._target_='os.makedirs' is not a diffctl class"):
        load_denoiser(tmp_path / "c.ckpt")
    assert not marker.exists()


def test_no_unchecked_unpickling_in_the_package():
    """Audit: every torch.load is weights_only=True, no pickle.load(s), no allow_pickle=True;
    the one pickle.Unpickler (CIFAR batches) whitelists numpy reconstruction only."""
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = "\n".join(line.split("#", 1)[0] for line in path.read_text().splitlines())  # code, not comments
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in call.group(1):
                problems.append(f"{path.name}: torch.load without weights_only=True")
        for pattern in (r"pickle\.loads?\(", r"allow_pickle\s*=\s*True", r"weights_only\s*=\s*False", r"\bdill\b", r"joblib\.load"):
            if re.search(pattern, text):
                problems.append(f"{path.name}: {pattern}")
        if "pickle.Unpickler" in text and "def find_class" not in text:
            problems.append(f"{path.name}: pickle.Unpickler without find_class")
    assert problems == []


def test_train_resume_refuses_a_stored_config_that_calls_foreign_code(tmp_path):
    """`train resume=` puts the stored model/sde/objective/data configs into the run and instantiates
    them: a foreign _target_ there is refused before anything is built."""
    marker = tmp_path / "PWNED"
    config = {"data": {"_target_": "os.makedirs", "_args_": [str(marker)]}, "model": {"_target_": "diffctl.networks.UNet"}}
    torch.save({"state_dict": {"ema.w": torch.zeros(1)}, "hyper_parameters": {"config": config}}, tmp_path / "c.ckpt")
    out = run_cli(["train", f"resume={tmp_path / 'c.ckpt'}", "logger=none", "progress_bar=false"], tmp_path)
    assert out.returncode == 1, out.stderr
    assert "data._target_='os.makedirs' is not a diffctl class" in out.stderr and "Traceback" not in out.stderr
    assert not marker.exists()


@pytest.mark.parametrize("zip_format", [True, False])
def test_checkpoints_are_memory_mapped_and_the_legacy_format_still_loads(tmp_path, zip_format):
    """Reading a checkpoint's config (resume=, first_stage=, sample) must not read its optimizer state:
    zip-format files (what torch.save and Lightning write) are memory-mapped, so a tensor's storage is
    the file itself until touched (its address lies in a mapping of the file, /proc/self/maps). torch.save's
    legacy format cannot be mapped and is read whole."""
    from diffctl.checkpoint import load_checkpoint

    path = tmp_path / "a.ckpt"
    weights = torch.arange(12.0).reshape(3, 4)
    torch.save({"state_dict": {"w": weights}, "hyper_parameters": {"config": {}}}, path, _use_new_zipfile_serialization=zip_format)
    loaded = load_checkpoint(path)["state_dict"]["w"]
    assert torch.equal(loaded, weights)
    assert _mapped_from(loaded, path) is zip_format
    loaded += 1  # copy-on-write: the file is unchanged
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], weights)


def _mapped_from(tensor: torch.Tensor, path: pathlib.Path) -> bool:
    address = tensor.data_ptr()
    for line in pathlib.Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path):
            start, end = (int(a, 16) for a in fields[0].split("-"))
            if start <= address < end:
                return True
    return False
