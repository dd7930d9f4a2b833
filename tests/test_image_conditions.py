"""Image conditions for image-to-image training (diffctl/image_conditions.py): the sources against
PIL (bicubic resize, luma), the masks' reproducibility over steps and devices, condition dropout, the
network really seeing the source, and `diffctl train condition=...` end to end with its bad inputs."""

import json

import numpy as np
import pytest
import torch
from helpers import run_cli, run_train, tiny_overrides
from PIL import Image

from diffctl.conditioning import IMAGE
from diffctl.denoiser import compose
from diffctl.image_conditions import SOURCE, Colorization, Inpainting, SuperResolution
from diffctl.networks import UNet
from diffctl.rng import BatchRandom
from diffctl.sde import VPSDE


def _uint8_images(n, c, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, c), dtype=np.uint8)


def _to_pm1(a):
    """uint8 NHWC -> float [-1, 1] NCHW."""
    return torch.from_numpy(a).permute(0, 3, 1, 2).double().div(127.5).sub(1)


def test_sr_downsampling_is_pils_bicubic():
    images = _uint8_images(3, 3, 16)
    sr = SuperResolution(3, 16, factor=4)
    low = sr.downsample(_to_pm1(images))
    pil = np.stack([np.asarray(Image.fromarray(im).resize((4, 4), Image.BICUBIC)) for im in images])
    # PIL rounds to uint8 (and clips); ours is float: within one level
    assert (low - _to_pm1(pil)).abs().max() <= 1.01 / 127.5
    up = sr.source(_to_pm1(images), None)
    assert up.shape == (3, 3, 16, 16) and up.abs().max() <= 1


def test_sr_area_filter_is_the_block_mean():
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64) * 2 - 1
    sr = SuperResolution(1, 8, factor=2, filter="area")
    low = sr.downsample(x)
    assert torch.allclose(low[0, 0, 1, 2], x[0, 0, 2:4, 4:6].mean())
    assert torch.equal(sr.source(x, None)[0, 0, 2:4, 4:6], low[0, 0, 1, 2].expand(2, 2))


def test_colorize_source_is_pils_luma():
    images = _uint8_images(4, 3, 8, seed=1)
    gray = Colorization(3, 8).source(_to_pm1(images), None)
    pil = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in images])[..., None]
    assert gray.shape == (4, 1, 8, 8)
    assert (gray - _to_pm1(pil)).abs().max() <= 1.01 / 127.5


def test_inpaint_masks_follow_the_step_draws_on_any_device_split():
    x0 = torch.rand(8, 1, 16, 16) * 2 - 1
    cond = Inpainting(1, 16)
    whole = cond.from_batch({IMAGE: x0}, BatchRandom(3, 5, 0, 0, 1, 8, "cpu"))[SOURCE]
    again = cond.from_batch({IMAGE: x0}, BatchRandom(3, 5, 0, 0, 1, 8, "cpu"))[SOURCE]
    other_step = cond.from_batch({IMAGE: x0}, BatchRandom(3, 6, 0, 0, 1, 8, "cpu"))[SOURCE]
    assert torch.equal(whole, again) and not torch.equal(whole[:, 1], other_step[:, 1])
    # rank 1 of 2 processes with 4 rows each sees rows 4..7 of the same global draws
    half = cond.from_batch({IMAGE: x0[4:]}, BatchRandom(3, 5, 0, 1, 2, 4, "cpu"))[SOURCE]
    assert torch.equal(half, whole[4:])
    known = whole[:, 1:]
    assert set(known.unique().tolist()) == {0.0, 1.0} and len({m.numpy().tobytes() for m in known}) > 1
    assert torch.equal(whole[:, :1], x0 * known)  # known pixels carry the image, the rest 0


def test_condition_dropout_zeroes_whole_sources_at_its_rate():
    cond = SuperResolution(1, 8, dropout=0.25)
    x0 = torch.rand(4000, 1, 8, 8) * 2 - 1
    rng = BatchRandom(0, 1, 0, 0, 1, 4000, "cpu")
    dropped = cond.drop(cond.from_batch({IMAGE: x0}), rng)[SOURCE]
    zero = (dropped.flatten(1) == 0).all(1).float()
    assert abs(zero.mean().item() - 0.25) < 4 * (0.25 * 0.75 / 4000) ** 0.5
    assert torch.equal(cond.null({SOURCE: dropped})[SOURCE], torch.zeros_like(dropped))


def test_the_network_sees_the_source():
    torch.manual_seed(0)
    sr = SuperResolution(1, 8)
    net = UNet(in_channels=1 + sr.extra_channels, out_channels=1, resolution=8, base_channels=16, channel_mult=[1, 2],
               num_res_blocks=1, attn_resolutions=[4])  # fmt: skip
    for p in net.parameters():  # zero-initialized output layers would hide the input
        torch.nn.init.normal_(p, std=0.1)
    model = compose(net, VPSDE(), "eps", conditioner=sr)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 0.5])
    a = model(x, t, {SOURCE: torch.zeros(2, 1, 8, 8)}).eps
    b = model(x, t, {SOURCE: torch.ones(2, 1, 8, 8)}).eps
    assert a.shape == (2, 1, 8, 8) and (a - b).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs cond"):
        model(x, t, {})


def _tiny(extra, model="unet"):
    return [*tiny_overrides(model), "trainer.max_steps=2", "sample_grid.num=4", "sample_grid.steps=2", *extra]


@pytest.mark.parametrize("condition,model", [("sr", "unet"), ("inpaint", "dit")])
def test_train_an_image_to_image_model(tmp_path, condition, model):
    from diffctl.build import load_denoiser

    run = tmp_path / "run"
    run_train(run, _tiny([f"condition={condition}"], model))
    model, cfg = load_denoiser(run / "checkpoints" / "last.ckpt")
    assert cfg.condition.name == condition and SOURCE in model.capabilities.conditions
    assert model.conditioner.extra_channels == {"sr": 1, "inpaint": 2}[condition]
    grid = np.asarray(Image.open(run / "samples" / "step_0000002.png"))
    assert grid.shape[1] > 3 * grid.shape[0]  # four images (source | output | target) side by side: 12 tiles wide, 1 high
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary  # training finished and summarized
    if condition == "sr":  # commands that make images from noise alone refuse it, in one line
        proc = run_cli(["sample", f"ckpt={run}", "num_samples=2", "metrics.names=[]", f"hydra.run.dir={tmp_path / 's'}"], tmp_path)
        assert proc.returncode == 1 and "is an image-to-image model" in proc.stderr.strip().splitlines()[-1]


def test_condition_class_is_conditional_true(tmp_path):
    from diffctl.build import load_denoiser

    run_train(tmp_path / "run", _tiny(["condition=class", "sample_grid.every_n_steps=0"]))
    model, _ = load_denoiser(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert model.capabilities.num_classes == 10 and model.capabilities.null_condition


def test_image_to_image_bad_inputs_are_one_line_errors(tmp_path):
    cases = [
        (["condition=colorize"], "condition=colorize needs RGB data"),
        (["condition=sr", "condition.factor=3"], "condition.factor must be an integer >= 2 dividing the resolution 8"),
        (["condition=sr", "conditional=true"], "with class labels (conditional=true) is not supported"),
        (["condition=sr", "condition.dropout=1"], "condition.dropout must be"),
        (["condition=sr", "model.out_channels=2"], "outputs the data's 1 channels"),
    ]
    for i, (extra, message) in enumerate(cases):
        proc = run_cli(["train", *_tiny(extra), f"hydra.run.dir={tmp_path / str(i)}"], tmp_path)
        assert proc.returncode == 1, (extra, proc.stderr[-2000:])
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and message in last, (extra, last)
