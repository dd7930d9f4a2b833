"""A diffusers AutoencoderKL folder that is missing, foreign or broken: one-line errors naming the problem,
raised by diffctl.first_stage before any tensor is used. The folders are written by hand (no diffusers)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from diffctl.errors import CheckpointError, ConfigError, DiffctlError
from diffctl.first_stage import CONFIG_NAME, WEIGHTS_NAME, autoencoder_from_config, diffusers_config, load_diffusers_vae
from diffctl.networks.autoencoder import AutoencoderKL

TINY = dict(block_out_channels=[8, 16], layers_per_block=1, latent_channels=4, norm_num_groups=4)
BASE = {"_class_name": "AutoencoderKL", **TINY, "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}


def folder(tmp_path, config=None, state=None, name="vae"):
    """A folder with config.json (a dict is dumped as JSON, bytes written raw) and weights (a state dict)."""
    d = tmp_path / name
    d.mkdir()
    model = AutoencoderKL(**TINY)
    config = diffusers_config(model) if config is None else config
    if config is not False:
        (d / CONFIG_NAME).write_bytes(config if isinstance(config, bytes) else json.dumps(config).encode())
    if state is not False:
        save_file(model.state_dict() if state is None else state, str(d / WEIGHTS_NAME))
    return d


def fails(path, cls, *fragments):
    with pytest.raises(cls) as info:
        load_diffusers_vae(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"first_stage={path}"), message
    for fragment in fragments:
        assert fragment in message, message


def test_good_folder_loads(tmp_path):
    assert isinstance(load_diffusers_vae(folder(tmp_path)), AutoencoderKL)


def test_missing_folder_or_files(tmp_path):
    fails(tmp_path / "nope", ConfigError, "no such folder")
    (tmp_path / "file").write_text("x")
    fails(tmp_path / "file", ConfigError, "not a folder")
    fails(folder(tmp_path, config=False, name="a"), ConfigError, f"no {CONFIG_NAME}")
    bin_only = folder(tmp_path, state=False, name="b")
    (bin_only / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x02")
    fails(bin_only, ConfigError, f"no {WEIGHTS_NAME}", "diffusion_pytorch_model.bin", "unpickling")


def test_pipeline_folder_points_to_its_vae(tmp_path):
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    (pipe / "model_index.json").write_text("{}")
    folder(pipe, name="vae")
    fails(pipe, ConfigError, "pipeline folder", str(pipe / "vae"))


@pytest.mark.parametrize(
    "config, fragments",
    [
        (b"\x00\x01binary", ["not JSON"]),
        (b"{not json", ["cannot read config.json"]),
        ([1, 2], ["not a JSON object"]),
        ({"_class_name": "UNet2DModel"}, ["_class_name='UNet2DModel'", "not a diffusers AutoencoderKL"]),
        ({**BASE, "act_fn": "gelu"}, ["act_fn='gelu'"]),
        ({**BASE, "down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]},
         ["down_block_types has 'AttnDownEncoderBlock2D'"]),
        ({**BASE, "up_block_types": ["UpDecoderBlock2D"]}, ["up_block_types", "one entry per", "(2)"]),
        ({**BASE, "norm_type": "spatial"}, ["unsupported key norm_type='spatial'"]),
        ({**BASE, "norm_num_groups": 3}, ["norm_num_groups=3 does not divide"]),
        ({**BASE, "layers_per_block": 0}, ["layers_per_block=0"]),
        ({**BASE, "block_out_channels": []}, ["block_out_channels=[]"]),
        ({**BASE, "use_quant_conv": "yes"}, ["use_quant_conv='yes'"]),
        ({**BASE, "shift_factor": "a"}, ["shift_factor='a'"]),
    ],
)  # fmt: skip
def test_bad_config(tmp_path, config, fragments):
    fails(folder(tmp_path, config=config), ConfigError, *fragments)


def test_ignored_keys_are_accepted():
    config = {**diffusers_config(AutoencoderKL(**TINY)), "_diffusers_version": "0.6.0", "sample_size": 512, "force_upcast": True,
              "latents_mean": None, "latents_std": None, "act_fn": "swish"}  # fmt: skip
    assert autoencoder_from_config(config).config == AutoencoderKL(**TINY).config


def test_bad_weights(tmp_path):
    good = AutoencoderKL(**TINY).state_dict()
    d = folder(tmp_path, state=False, name="text")
    (d / WEIGHTS_NAME).write_text("hello")
    fails(d, CheckpointError, "not a safetensors file", "text file")
    d = folder(tmp_path, name="cut")
    data = (d / WEIGHTS_NAME).read_bytes()
    (d / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    fails(d, CheckpointError, "cut short")
    missing = {k: v for k, v in good.items() if not k.startswith("decoder.conv_out.")}
    fails(folder(tmp_path, state=missing, name="missing"), CheckpointError, "decoder.conv_out.weight (and 1 more) missing from the file")
    extra = {**good, "decoder.extra.weight": torch.zeros(1)}
    fails(folder(tmp_path, state=extra, name="extra"), CheckpointError, "decoder.extra.weight in the file but not in its config.json")
    shaped = {**good, "quant_conv.bias": torch.zeros(9)}
    fails(folder(tmp_path, state=shaped, name="shape"), CheckpointError, "quant_conv.bias is [9] in the file but [8] in its config.json")
    # a folder for a wider network than its weights: the config decides, the weights are refused
    wide = {**diffusers_config(AutoencoderKL(**TINY)), "block_out_channels": [8, 32]}
    fails(folder(tmp_path, config=wide, name="wide"), CheckpointError, "more of another shape")


def test_constructor_errors_name_the_key():
    for kw, fragment in [(dict(in_channels=0), "in_channels=0"), (dict(block_out_channels="64"), "block_out_channels='64'"),
                         (dict(scaling_factor=0), "scaling_factor=0"), (dict(latent_channels=2.5), "latent_channels=2.5")]:  # fmt: skip
        with pytest.raises(DiffctlError, match=fragment.replace("(", r"\(")):
            AutoencoderKL(**{**TINY, **kw})
