"""Every experiment preset runs for real, not only composes: conf/experiment/*.yaml is globbed, so a preset
added later is covered without editing this file. Each one trains 2 steps on a few images written in its
dataset's own on-disk format, writes its sample grid with its own grid sampler, and `diffctl sample` draws
once from the checkpoint with that sampler. Only the network's size, the batch, the step counts and the
device are shrunk; the SDE, objective, dataset format, resolution, channels and sampler stay the preset's."""

import dataclasses
import functools

import numpy as np
import pytest
from helpers import TINY_DIT, TINY_UNET, compose_train, run_sample, run_train
from PIL import Image
from test_data import make_cifar, make_idx_set

import diffctl.samplers
from diffctl.samplers import sampler_spec
from diffctl.cli import config_dir

PRESETS = sorted(p.stem for p in (config_dir() / "experiment").glob("*.yaml"))
SHRINK = {  # network target -> overrides that keep its kind but make 2 steps take well under a second
    "diffctl.networks.UNet": TINY_UNET,
    "diffctl.networks.DiT": [*TINY_DIT, "model.size=null"],
}
RUN = [
    "trainer=cpu",  # the papers' presets pick trainer=gpu; the rest of the trainer config stays the preset's
    "trainer.max_steps=2",
    "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
    "logger=none",
    "progress_bar=false",
    "data.batch_size=4",
    "data.num_workers=0",
    "sample_grid.every_n_steps=0",  # one grid, at the end
    "sample_grid.num=4",
    "sample_grid.steps=2",
    "sample_grid.consistency_steps=2",
    "checkpoint.every_n_steps=1000",
]


def write_tiny_data(name: str, root, resolution: int, channels: int) -> None:
    """A few images in the on-disk format data=<name> reads."""
    if name in ("mnist", "fashion_mnist"):
        make_idx_set(root)
    elif name == "cifar10":
        make_cifar(root)
    elif name == "imagefolder":
        rng = np.random.default_rng(0)
        root.mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)
            Image.fromarray(pixels).convert("L" if channels == 1 else "RGB").save(root / f"{i}.png")
    elif name != "digits":  # digits ships with scikit-learn
        pytest.fail(f"no tiny-data writer for data={name}: add one to write_tiny_data in tests/test_presets.py")


@pytest.fixture
def sampler_calls(monkeypatch):
    """(name, options) of the sampler functions run, in order (wrapped in place, so generate() still checks options)."""
    calls = []
    for name, sampler in list(diffctl.samplers.SAMPLERS.items()):

        @functools.wraps(sampler.fn)
        def record(*args, _name=name, _fn=sampler.fn, **kwargs):
            calls.append((_name, {k: v for k, v in kwargs.items() if k not in ("cond", "noise")}))
            return _fn(*args, **kwargs)

        monkeypatch.setitem(diffctl.samplers.SAMPLERS, name, dataclasses.replace(sampler, fn=record))
    return calls


def test_presets_are_found():
    assert {"quickstart", "cifar10_ddpm", "cifar10_vp", "cifar10_ve"} <= set(PRESETS)


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_writes_its_grid_and_samples(preset, tmp_path, sampler_calls):
    paper = compose_train(tmp_path / "compose", [f"experiment={preset}"])
    data, model = paper.data, paper.model
    assert model._target_ in SHRINK, f"experiment={preset}: no shrink overrides for {model._target_} in SHRINK"
    root = tmp_path / "data"
    write_tiny_data(data.name, root, data.resolution, data.channels)
    overrides = [f"experiment={preset}", *RUN, *SHRINK[model._target_], f"data.root={root}"]
    run_dir = tmp_path / "run"
    cfg = compose_train(run_dir, overrides)
    for key in ("sde", "objective", "denoiser"):  # the science is untouched by the shrinking overrides
        assert cfg[key] == paper[key], key
    assert (cfg.data.name, cfg.data.resolution, cfg.data.channels) == (data.name, data.resolution, data.channels)
    assert cfg.sample_grid.sampler == paper.sample_grid.sampler

    result = run_train(run_dir, overrides)
    assert result["global_step"] == 2 and np.isfinite(result["loss"])
    consistency = cfg.objective._target_.endswith("ConsistencyObjective")
    # train.py's rule for the grid: the preset's sampler, with its options, unless the model is a consistency model
    spec = {"name": "consistency"} if consistency else sampler_spec(cfg.sample_grid.sampler)
    sampler, options = spec.pop("name"), spec
    assert sampler_calls == [(sampler, options)]
    with Image.open(run_dir / "samples" / "step_0000002.png") as grid:
        assert grid.mode == ("L" if data.channels == 1 else "RGB")

    out = tmp_path / "sample"
    run_sample(out, [f"ckpt={run_dir}", f"sampler={sampler}", *(f"sampler.{k}={v}" for k, v in options.items()), "steps=2", "num_samples=4", "batch_size=4",
                     "metrics.names=[]", "trainer.accelerator=cpu"])  # fmt: skip
    assert sampler_calls[1][0] == sampler and options.items() <= sampler_calls[1][1].items()
    with np.load(out / "samples.npz") as z:
        images = z["samples"]
    assert images.shape == (4, data.resolution, data.resolution, data.channels) and images.dtype == np.uint8
