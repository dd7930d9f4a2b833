"""`diffctl export`: EMA/raw weights as .safetensors + config JSON, sampled to the same images as the
checkpoint; nothing overwritten; broken exports are one-line errors."""

import json

import numpy as np
import pytest
import torch
from helpers import compose_train, run_cli, run_sample, tiny_trained_run

from diffctl.errors import CheckpointError, ConfigError

NO_METRICS = ["metrics.names=[]"]
SAMPLE = ["sampler=ddim", "steps=3", "num_samples=4", "batch_size=4", *NO_METRICS]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The session's tiny 2-step U-Net run (helpers.tiny_trained_run), this module's own copy of it."""
    return tiny_trained_run(tmp_path_factory, tmp_path_factory.mktemp("export") / "run")


def export(out_dir, overrides):
    from diffctl.export import export as run

    return run(compose_train(out_dir, overrides, config_name="export"))


def _samples(out):
    return np.load(out / "samples.npz")["samples"]


def test_cli_export_samples_like_the_checkpoint(trained, tmp_path):
    result = run_cli(["export", f"ckpt={trained}", "format=safetensors", f"hydra.run.dir={tmp_path / 'exp'}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    weights, config = tmp_path / "exp" / "model.safetensors", tmp_path / "exp" / "model.json"
    meta = json.loads(config.read_text())
    assert meta["format"] == "diffctl-export" and meta["weights"] == "ema"
    assert meta["config"]["model"]["_target_"] == "diffctl.networks.UNet" and meta["config"]["data_shape"]["channels"] == 1
    from safetensors.torch import load_file

    from diffctl.checkpoint import denoiser_state, load_checkpoint

    stored = denoiser_state(load_checkpoint(trained), use_ema=True)
    exported = load_file(str(weights))
    assert exported.keys() == stored.keys() and all((exported[k] == stored[k]).all() for k in stored)
    run_sample(tmp_path / "from_ckpt", [f"ckpt={trained}", *SAMPLE])
    run_sample(tmp_path / "from_file", [f"ckpt={weights}", *SAMPLE])
    run_sample(tmp_path / "from_dir", [f"ckpt={tmp_path / 'exp'}", *SAMPLE])
    a, b, c = (_samples(tmp_path / d) for d in ("from_ckpt", "from_file", "from_dir"))
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert json.loads((tmp_path / "from_file" / "metrics.json").read_text())["weights"] == "ema"


def test_raw_export_samples_like_raw_weights_and_is_never_overwritten(trained, tmp_path):
    out = tmp_path / "raw.safetensors"
    export(tmp_path / "log", [f"ckpt={trained}", "use_ema=false", f"out={out}"])
    assert out.is_file() and (tmp_path / "raw.json").is_file()
    run_sample(tmp_path / "ckpt", [f"ckpt={trained}", "use_ema=false", *SAMPLE])
    result = run_sample(tmp_path / "exp", [f"ckpt={out}", *SAMPLE])
    np.testing.assert_array_equal(_samples(tmp_path / "ckpt"), _samples(tmp_path / "exp"))
    assert result["weights"] == "raw"
    # The raw weights were exported, not the EMA (after 2 steps they differ; the 2-step model's
    # images are mostly saturated at 0/255, so comparing samples could not tell them apart).
    from safetensors.torch import load_file

    from diffctl.checkpoint import denoiser_state, load_checkpoint

    exported, ckpt = load_file(str(out)), load_checkpoint(trained)
    raw, ema = denoiser_state(ckpt, use_ema=False), denoiser_state(ckpt, use_ema=True)
    assert exported.keys() == raw.keys() and all(torch.equal(exported[k], raw[k]) for k in raw)
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    before = out.read_bytes()
    with pytest.raises(ConfigError, match=rf"{out} already exists"):
        export(tmp_path / "log2", [f"ckpt={trained}", f"out={out}"])
    assert out.read_bytes() == before


def _broken(tmp_path, trained, how):
    out = tmp_path / "m.safetensors"
    export(tmp_path / "log", [f"ckpt={trained}", f"out={out}"])
    config = tmp_path / "m.json"
    if how == "json missing":
        config.unlink()
    elif how == "json mismatch":
        meta = json.loads(config.read_text())
        meta["config"]["model"]["base_channels"] = 8
        config.write_text(json.dumps(meta))
    elif how == "json garbage":
        config.write_text("{not json")
    elif how == "truncated":
        out.write_bytes(out.read_bytes()[: out.stat().st_size // 2])
    elif how == "foreign target":
        meta = json.loads(config.read_text())
        meta["config"]["sde"] = {"_target_": "os.makedirs", "_args_": [str(tmp_path / "PWNED")]}
        config.write_text(json.dumps(meta))
    return out


@pytest.mark.parametrize(
    "how,message",
    [
        ("json missing", "export config not found"),
        ("json mismatch", "do not fit the network in its config"),
        ("json garbage", "cannot read export config"),
        ("truncated", "truncated or not a safetensors file"),
        ("foreign target", "is not a diffctl class"),
    ],
)
def test_broken_exports_are_checkpoint_errors(trained, tmp_path, how, message):
    out = _broken(tmp_path, trained, how)
    with pytest.raises(CheckpointError, match=message):
        run_sample(tmp_path / "s", [f"ckpt={out}", *SAMPLE])
    assert not (tmp_path / "PWNED").exists()


def test_truncated_export_is_a_one_line_cli_error(trained, tmp_path):
    out = _broken(tmp_path, trained, "truncated")
    result = run_cli(["sample", f"ckpt={out}", f"hydra.run.dir={tmp_path / 's'}", *NO_METRICS], tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "truncated or not a safetensors file" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args,error,message",
    [
        (["format=onnx"], ConfigError, "format must be one of safetensors"),
        (["ckpt={tmp}/nope.ckpt"], CheckpointError, "checkpoint not found"),
        (["ckpt=null"], ConfigError, "export needs ckpt="),
        (["out={tmp}/m.json"], ConfigError, "names the config"),
    ],
)
def test_bad_export_arguments(trained, tmp_path, args, error, message):
    overrides = [f"ckpt={trained}", *(a.format(tmp=tmp_path) for a in args)]
    with pytest.raises(error, match=message):
        export(tmp_path / "log", overrides)
    assert not list(tmp_path.glob("**/*.safetensors"))
