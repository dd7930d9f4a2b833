"""What the CLI imports before it answers (diffctl/cli.py, diffctl/_compat.py, diffctl/schema/choices.py).

`diffctl --help` imports none of torch, Lightning, Hydra; a command's --help and a config error import no
torch or Lightning: the config is composed by Hydra and checked by the schema first. The samplers'
options are declared by the samplers (diffctl/samplers/registry.py), which import torch: an error in a
sampler key given on the command line imports torch but not Lightning nor the command's module, and
one elsewhere imports no torch (the samplers' nodes are checked when the command line may have changed
them). These tests look at sys.modules in a fresh interpreter and time nothing (scripts/bench_cli.py
times the commands)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

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
        (["sample", "steps=0"], "error: steps must be a positive integer, got 0"),
        (["fid-stats", "metrics.detector=no-such"], "error: metrics.detector must be one of auto, inception"),
        (["metrics", "names=[fid,lpips]"], "error: names must be a list of distinct names from fid, kid, is"),
    ],
)
def test_config_error_is_reported_before_torch_is_imported(tmp_path, args, message):
    code, _, err, loaded = _cli([*args, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert code == 1 and len(err) == 1 and err[0].startswith(message), err
    assert loaded == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["sample", "sampler=ddim", "sampler.eta=2"], "error: sampler.eta must be in [0, 1] (0 = deterministic DDIM"),
        (["sample", "sampler=pc", "sampler.variance=large"], "error: sampler.variance=large is the ancestral predictor's"),
        (["sample", "sampler=dpm"], "error: sampler=dpm: there is no config 'sampler/dpm'; choose one of: consistency, ddim"),
        (["train", "sample_grid.sampler={name: ddpm, eta: 1}"], "error: sample_grid.sampler=ddpm has no option eta"),
        (["train", "sample_grid.sampler=dpm"], "error: sample_grid.sampler must be one of consistency, ddim, ddpm, dpmpp_2m_sde, dpmpp_3m_sde, edm, euler_ancestral, ode, pc, got 'dpm'"),
    ],
)
def test_a_sampler_error_is_reported_before_lightning_and_the_command_are_imported(tmp_path, args, message):
    probe = (*HEAVY, "diffctl.sample", "diffctl.train")
    code, _, err, loaded = _cli([*args, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, probe=probe)
    assert code == 1 and len(err) == 1 and err[0].startswith(message), err
    # the samplers' rules import torch; Hydra itself refuses a sampler without a YAML, before the schema
    assert loaded == ([] if "no config" in message else ["torch"])


def test_the_first_check_skips_the_samplers_only_where_the_command_line_cannot_have_changed_them():
    from diffctl.cli import sets_sampler

    for override in ("sampler=ddim", "sampler.eta=2", "+sampler.x=1", "~sampler.eta", "++sample_grid.sampler.eta=1",
                     "sample_grid.sampler=ddpm", "sample_grid={num: 4}", "sampler@sample_grid.sampler=ddim"):  # fmt: skip
        assert sets_sampler(["steps=3", override]), override
    assert not sets_sampler(["steps=3", "sample_grid.steps=4", "optim.lr=1", "experiment=quickstart", "samplers_dir=x"])
    assert sets_sampler([], ["hydra", "main", "command-line"])  # --config-dir: the user's configs may hold samplers
    assert sets_sampler([], ["hydra", "main", "hydra.searchpath in command-line"])


def test_a_bad_sampler_in_an_unchecked_config_is_still_refused_by_the_command(tmp_path):
    """samplers=False (the CLI's first check) leaves the sampler nodes to the command's own validation."""
    from diffctl.config import compose_config
    from diffctl.errors import ConfigError
    from diffctl.schema import validate

    data = OmegaConf.to_container(compose_config("sample", ["sampler=ddim"], tmp_path))
    data["sampler"]["eta"] = 2
    validate(data, "sample", samplers=False)
    with pytest.raises(ConfigError, match=r"^sampler.eta must be in \[0, 1\]"):
        validate(data, "sample")


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
    Lightning (a trainer value in conf/ outside the names known without Lightning would import it).
    The sampler nodes, which the CLI's first check skips for them, are the samplers' own YAMLs
    (tests/test_sampler_registry.py) and presets (validated whole in tests/test_bad_inputs_schema.py)."""
    from diffctl.cli import config_groups

    configs = [("train", [f"trainer={t}"]) for t in config_groups()["trainer"]]
    configs += [("sample", []), ("likelihood", []), ("fid_stats", []), ("export", []), ("train", ["model=dit"]),
                ("metrics_command", [])]
    code = f"""
import json, os, sys
from diffctl.config import compose_config
from diffctl.schema import validate
for command, overrides in {configs!r}:
    validate(compose_config(command, overrides, {str(tmp_path)!r}), command, samplers=False)
print(json.dumps(sorted(m for m in {[*HEAVY, "diffctl.samplers"]!r} if m in sys.modules)), file=sys.stderr)
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


def test_lightning_names_known_without_lightning_are_registered_by_it():
    trainer = SCHEMAS["train"]()["trainer"].keys
    for key in ("accelerator", "strategy"):
        rule = trainer[key]
        assert set(rule.known) <= set(rule.full().choices), key
