"""What the CLI imports before it answers (diffctl/cli.py, diffctl/_compat.py, diffctl/schema/choices.py).

`diffctl --help` imports none of torch, Lightning, Hydra; a command's --help and a config error import no
torch or Lightning: the config is composed by Hydra and checked by the schema first. These tests look
at sys.modules in a fresh interpreter and time nothing (scripts/bench_cli.py times the commands)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffctl.schema import SCHEMAS

HEAVY = ("torch", "torchvision", "lightning", "torchmetrics")

# Runs `diffctl <argv>` in this interpreter, then prints (on stderr's last line) which of the modules
# given in DIFFCTL_PROBE it ended up with, whatever the command's exit status.
PROBE = """
import atexit, json, os, sys
probe = os.environ["DIFFCTL_PROBE"].split(",")
atexit.register(lambda: print(json.dumps(sorted(m for m in probe if m in sys.modules)), file=sys.stderr))
from diffctl.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run(code: str, args: list[str], cwd: Path, probe=HEAVY) -> tuple[subprocess.CompletedProcess, list[str]]:
    env = {**os.environ, "DIFFCTL_PROBE": ",".join(probe)}
    env.pop("HYDRA_FULL_ERROR", None)
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return out, json.loads(out.stderr.strip().splitlines()[-1])


def _cli(args: list[str], cwd: Path, probe=HEAVY):
    out, loaded = _run(PROBE, args, cwd, probe)
    return out.returncode, out.stdout, out.stderr.strip().splitlines()[:-1], loaded


@pytest.mark.parametrize("args", [["--help"], ["--version"]])
def test_top_level_help_imports_no_torch_lightning_or_hydra(tmp_path, args):
    code, stdout, _, loaded = _cli(args, tmp_path, probe=(*HEAVY, "hydra", "omegaconf"))
    assert code == 0 and stdout.strip()
    assert loaded == []
    if args == ["--help"]:  # the config groups are read from conf/ without Hydra
        assert any(line.strip().startswith("model ") and "unet" in line for line in stdout.splitlines()), stdout


@pytest.mark.parametrize("command", ["train", "sample"])  # (the other commands' configs: the preset test below)
def test_command_help_imports_no_torch_or_lightning(tmp_path, command):
    code, stdout, _, loaded = _cli([command, "--help"], tmp_path)
    assert code == 0 and f"diffctl {command}" in stdout
    assert loaded == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "optim.lr=-1"], "error: optim.lr must be > 0, got -1"),
        (["train", "+optim.lrr=1"], "error: optim.lrr: no such config key of diffctl train; close matches: optim.lr"),
        (["sample", "sampler=ddim", "sampler.eta=2"], "error: sampler.eta must be in [0, 1] (0 = deterministic DDIM"),
        (["fid-stats", "metrics.detector=no-such"], "error: metrics.detector must be one of auto, inception"),
    ],
)
def test_config_error_is_reported_before_torch_is_imported(tmp_path, args, message):
    code, _, err, loaded = _cli([*args, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert code == 1 and len(err) == 1 and err[0].startswith(message), err
    assert loaded == []


def test_a_trainer_value_outside_the_known_names_is_checked_against_lightning(tmp_path):
    from diffctl.config import compose_config
    from diffctl.errors import ConfigError
    from diffctl.schema import validate

    with pytest.raises(ConfigError) as err:
        validate(compose_config("train", ["trainer.strategy=no-such"], tmp_path), "train")
    # every strategy Lightning registers is listed, also those conf/ never uses
    assert str(err.value).startswith("trainer.strategy must be one of auto, ddp") and "ddp_find_unused_parameters_true" in str(err.value)
    assert str(err.value).endswith("got 'no-such'")


def test_every_preset_config_is_validated_without_torch(tmp_path):
    """The schema accepts each command's config, with every trainer preset, without importing torch or
    Lightning (a trainer value in conf/ outside the names known without Lightning would import it)."""
    from diffctl.cli import config_groups

    configs = [("train", [f"trainer={t}"]) for t in config_groups()["trainer"]]
    configs += [("sample", []), ("likelihood", []), ("fid_stats", []), ("export", []), ("train", ["model=dit"])]
    code = f"""
import json, os, sys
from diffctl.config import compose_config
from diffctl.schema import validate
for command, overrides in {configs!r}:
    validate(compose_config(command, overrides, {str(tmp_path)!r}), command)
print(json.dumps(sorted(m for m in {list(HEAVY)!r} if m in sys.modules)), file=sys.stderr)
"""
    out, loaded = _run(code, [], tmp_path)
    assert out.returncode == 0, out.stderr
    assert loaded == []


def test_torchvision_imported_later_still_gets_the_shim(tmp_path):
    """`import diffctl` imports no torch; torchvision imported afterwards (by diffctl, Lightning,
    torchmetrics or anyone, here after a find_spec as Lightning's availability checks do) works, through
    the operator shim where the plain import fails (PyPI's CUDA torchvision beside CPU torch)."""
    plain = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True, timeout=300)
    needs_shim = plain.returncode != 0
    if needs_shim:
        assert "torchvision::nms" in plain.stderr, plain.stderr  # the one failure the shim is for
    code = """
import importlib.util, json, sys
import diffctl
from diffctl._compat import shim_applied
early = sorted(m for m in ("torch", "torchvision") if m in sys.modules)
assert importlib.util.find_spec("torchvision") is not None
from torchvision.datasets import ImageFolder
from torchvision.utils import make_grid
import torchvision
print(json.dumps([early, shim_applied(), type(torchvision.__spec__.loader).__name__]), file=sys.stderr)
"""
    out, (early, applied, loader) = _run(code, [], tmp_path)
    assert out.returncode == 0, out.stderr
    assert early == []
    assert applied is needs_shim
    assert loader != "_ShimLoader"  # once imported, torchvision looks as a plain import leaves it


def test_a_second_import_diffctl_installs_no_second_hook():
    from diffctl._compat import install_torchvision_shim

    before = list(sys.meta_path)
    install_torchvision_shim()
    assert sys.meta_path == before


def test_sampler_names_the_schema_checks_are_the_samplers_own():
    """diffctl/schema/choices.py declares the samplers' names and options for the torch-free check; they
    must be what the samplers implement (their signatures and dispatch tables)."""
    from diffctl.samplers import undeclared

    assert undeclared() == []


def test_lightning_names_known_without_lightning_are_registered_by_it():
    trainer = SCHEMAS["train"]()["trainer"].keys
    for key in ("accelerator", "strategy"):
        rule = trainer[key]
        assert set(rule.known) <= set(rule.full().choices), key
