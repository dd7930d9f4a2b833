"""Files that are not what they claim (issue 14, section 3): every file diffctl reads is identified
before use, and a wrong or damaged one is refused with one line naming it and what it is, or (a cache
entry) recomputed and replaced. Real files throughout: PNGs written by PIL in each mode, checkpoints,
shards and caches made by tiny real runs and then cut short or swapped."""

import json
import pickle
import zipfile

import numpy as np
import pytest
import torch
from helpers import interrupted_run, run_cli, run_sample, run_train, tiny_overrides
from omegaconf import OmegaConf
from PIL import Image
from test_bad_inputs import STARTUP_INFO

from diffctl.build import read_export
from diffctl.checkpoint import load_checkpoint
from diffctl.data import DataError, build_dataset
from diffctl.errors import CheckpointError, ConfigError
from diffctl.image_files import ImageFileError

HINT = "not a diffctl checkpoint (a .ckpt from `diffctl train`, a run directory, or a .safetensors from `diffctl export`)"


def _assert_user_error(out, *fragments):
    """Exit 1, no traceback, and one error line holding every fragment (Lightning's start-up lines
    are not part of it; nothing else is on stderr)."""
    assert out.returncode == 1, (out.returncode, out.stdout[-2000:], out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    others = [line for line in out.stderr.splitlines() if line.strip() and not line.startswith("error:")
              and not STARTUP_INFO.match(line)]
    assert len(errors) == 1 and not others, out.stderr
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])


def _cut(path, fraction=0.5):
    """`path` cut short, as a kill mid-copy or a full disk leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


# ---------------------------------------------------------------- checkpoints and exports


def _not_checkpoints(tmp, real_ckpt):
    from safetensors.torch import save_file

    (tmp / "notes.ckpt").write_text("step 100: loss 0.1\n")
    Image.new("RGB", (4, 4), (1, 2, 3)).save(tmp / "grid.ckpt", format="PNG")
    (tmp / "empty.ckpt").write_bytes(b"")
    (tmp / "run_without_ckpt").mkdir()
    save_file({"w": torch.zeros(3)}, str(tmp / "other.ckpt"))
    with zipfile.ZipFile(tmp / "archive.ckpt", "w") as zf:
        zf.writestr("readme.txt", "not torch")
    torch.save(torch.zeros(3, 4), tmp / "tensor.ckpt")
    torch.save({"model": {"w": torch.zeros(3)}, "epoch": 3}, tmp / "foreign.pt")
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp / "script.ckpt"))
    np.savez(tmp / "arrays.npz", a=np.zeros(2))
    with open(tmp / "plain.pkl", "wb") as f:
        pickle.dump({"state_dict": {}}, f)
    (tmp / "half.ckpt").write_bytes(real_ckpt.read_bytes()[: real_ckpt.stat().st_size // 2])
    return {
        "notes.ckpt": "is a text file (beginning 'step 100: loss 0.1'), " + HINT,
        "grid.ckpt": "is a PNG image, " + HINT,
        "empty.ckpt": "is an empty file (0 bytes), " + HINT,
        "run_without_ckpt": "is a directory without checkpoints (expected",
        "other.ckpt": "is a safetensors file, " + HINT,
        "archive.ckpt": "is a zip archive that is not a PyTorch or NumPy file (1 members), " + HINT,
        "tensor.ckpt": "holds a Tensor of shape [3, 4], not a diffctl training checkpoint",
        "foreign.pt": "is not a diffctl training checkpoint (no 'state_dict' entry; its keys: model, epoch)",
        "script.ckpt": "is a TorchScript module (torch.jit.save), " + HINT,
        "arrays.npz": "is a NumPy .npz archive, " + HINT,
        "plain.pkl": "is a Python pickle (not written by torch.save), " + HINT,
        "half.ckpt": "the file is truncated or not a PyTorch checkpoint (a zip archive cut short",
    }


def test_every_kind_of_wrong_checkpoint_is_named_and_left_as_it_was(trained, tmp_path):
    _, run_dir = trained
    cases = _not_checkpoints(tmp_path, run_dir / "checkpoints" / "last.ckpt")
    for name, fragment in cases.items():
        path = tmp_path / name
        before = None if path.is_dir() else path.read_bytes()
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(path)
        message = str(err.value)
        assert "\n" not in message and f"ckpt={path}" in message and fragment in message, (name, message)
        assert before is None or path.read_bytes() == before
    with pytest.raises(CheckpointError, match=r"resume=.*grid.ckpt is a PNG image, not a diffctl checkpoint \(a .ckpt from "
                                               r"`diffctl train` or its run directory\)"):
        load_checkpoint(tmp_path / "grid.ckpt", "resume")


def test_a_png_as_ckpt_is_one_line_from_the_cli(tmp_path):
    png = tmp_path / "samples.png"
    Image.new("RGB", (8, 8)).save(png)
    out = run_cli(["sample", f"ckpt={png}", "metrics.names=[]", "progress_bar=false", f"hydra.run.dir={tmp_path / 'out'}"], tmp_path)
    _assert_user_error(out, f"ckpt={png} is a PNG image, " + HINT)
    assert not (tmp_path / "out" / "samples.npz").exists()


def test_train_resume_of_a_text_file_names_it_before_building_anything(tmp_path):
    notes = tmp_path / "last.ckpt"
    notes.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match=r"resume=.*last.ckpt is a text file \(beginning 'not a checkpoint'\)"):
        run_train(tmp_path / "run", [*tiny_overrides("unet"), f"resume={notes}"])
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_exports_that_are_not_exports_are_named(tmp_path):
    from safetensors.torch import save_file

    foreign = tmp_path / "model.safetensors"  # e.g. from another library: no diffctl .json beside it
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match=r"model.safetensors without it is a safetensors file, not a diffctl export"):
        read_export(foreign)
    fake = tmp_path / "fake.safetensors"  # a PNG renamed, with a config next to it
    Image.new("L", (4, 4)).save(fake, format="PNG")
    (tmp_path / "fake.json").write_text(json.dumps({"format": "diffctl-export", "version": 1, "config": {}}))
    with pytest.raises(CheckpointError, match=r"truncated or not a safetensors file \(it is a PNG image\)"):
        read_export(fake)


# ---------------------------------------------------------------- caches

class _PoolFeatures(torch.nn.Module):
    """A tiny TorchScript detector: uint8 [B, 3, H, W] -> 12 pooled features."""

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 2).flatten(1)


def _metrics_cfg(tmp_path, **overrides):
    from diffctl.cli import config_dir

    detector = tmp_path / "pool.pt"
    if not detector.exists():
        torch.jit.script(_PoolFeatures()).save(str(detector))
    cfg = OmegaConf.load(config_dir() / "metrics" / "default.yaml")
    cfg.merge_with({"cache_dir": str(tmp_path / "cache"), "progress_bar": False, "detector": "torchscript",
                    "detector_path": str(detector), "ref_limit": 40, **overrides})  # fmt: skip
    return cfg


@pytest.mark.parametrize("damage", ["cut short", "replaced by a PNG", "inconsistent arrays"])
def test_a_damaged_reference_cache_entry_is_recomputed_and_replaced(tmp_path, capsys, damage):
    from diffctl.detectors import load_detector
    from diffctl.metrics import ref_source, reference

    cfg, cpu = _metrics_cfg(tmp_path), torch.device("cpu")
    src = ref_source(cfg, OmegaConf.create({"name": "digits", "resolution": 8, "channels": 1}))
    detector = load_detector(cfg, cpu)
    first = reference(cfg, src, detector, cpu, progress=False)
    entry = first.path
    if damage == "cut short":
        _cut(entry)
    elif damage == "replaced by a PNG":
        Image.new("L", (2, 2)).save(entry, format="PNG")
    else:
        with open(entry, "wb") as f:
            np.savez(f, features=np.zeros((3, 5), np.float32), mu=np.zeros(12), sigma=np.eye(12))
    capsys.readouterr()
    again = reference(cfg, src, detector, cpu, progress=False)
    out = capsys.readouterr().out
    assert f"note: reference statistics: unusable cache entry (cache {entry}" in out and "recomputing and replacing it" in out
    torch.testing.assert_close(again.features, first.features)
    with np.load(entry) as z:  # replaced by a whole entry: the next run reads it
        np.testing.assert_array_equal(z["features"], first.features.numpy())
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temporary left beside it
    reference(cfg, src, detector, cpu, progress=False)
    assert f"reference statistics: cached {entry}" in capsys.readouterr().out


def test_fid_stats_runs_after_its_cache_entry_was_cut_short(tmp_path):
    from diffctl.detectors import load_detector
    from diffctl.metrics import ref_source, reference

    cfg, cpu = _metrics_cfg(tmp_path), torch.device("cpu")
    data = OmegaConf.create({"name": "digits", "resolution": 8, "channels": 1})
    entry = reference(cfg, ref_source(cfg, data), load_detector(cfg, cpu), cpu, progress=False).path
    _cut(entry, 0.3)
    args = ["fid-stats", "data=digits", "data.resolution=8", "data.channels=1", "metrics.detector=torchscript",
            f"metrics.detector_path={cfg.detector_path}", f"metrics.cache_dir={cfg.cache_dir}", "metrics.ref_limit=40",
            "metrics.progress_bar=false",
            f"hydra.run.dir={tmp_path / 'stats'}"]  # fmt: skip
    out = run_cli(args, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"unusable cache entry (cache {entry} is a zip archive cut short" in out.stdout
    with np.load(entry) as z, np.load(tmp_path / "stats" / "ref_stats.npz") as stats:
        np.testing.assert_allclose(stats["mu"], z["features"].astype(np.float64).mean(0), rtol=1e-6)


def test_a_damaged_cached_detector_is_removed_and_not_used(tmp_path, capsys):
    from helpers import edm_detector

    from diffctl.detectors import EDM_FILE, edm_path

    installed = edm_detector()
    cached = tmp_path / "cache" / "detectors" / EDM_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(installed.read_bytes()[:4096])  # a copy cut short
    assert edm_path(_metrics_cfg(tmp_path, detector="edm", detector_path=None, download=False)) == installed
    assert f"note: the cached EDM detector {cached} is a zip archive cut short" in capsys.readouterr().out
    assert not cached.exists()


# ---------------------------------------------------------------- metrics.ref, datasets, mixture files


def _ref_files(tmp):
    Image.new("RGB", (2, 2)).save(tmp / "png.npz", format="PNG")
    with open(tmp / "array.npz", "wb") as f:
        np.save(f, np.zeros(3))
    np.savez(tmp / "keys.npz", mean=np.zeros(3), cov=np.eye(3))
    np.savez(tmp / "dims.npz", mu=np.zeros(3), sigma=np.eye(4))
    np.savez(tmp / "text.npz", mu=np.array(["a", "b"]), sigma=np.eye(2))
    (tmp / "folder.npz").mkdir()
    np.savez(tmp / "whole.npz", mu=np.zeros(3), sigma=np.eye(3))
    _cut(tmp / "whole.npz")
    return {
        "png.npz": "is a PNG image, not a .npz archive with mu and sigma arrays",
        "array.npz": "is a NumPy .npy array (not an .npz archive), not a .npz archive",
        "keys.npz": "has no mu, sigma arrays (found: mean, cov)",
        "dims.npz": "mu must be [D] and sigma [D, D], got (3,) and (4, 4)",
        "text.npz": "mu holds <U1 values, not numbers",
        "folder.npz": "is a directory, not a .npz archive",
        "whole.npz": "is a zip archive cut short or damaged",
    }


def test_metrics_ref_that_is_not_reference_statistics_is_named(tmp_path):
    from diffctl.metrics import evaluate

    for name, fragment in _ref_files(tmp_path).items():
        cfg = _metrics_cfg(tmp_path, ref=str(tmp_path / name), names=["fid"], fid_min_samples=0)
        with pytest.raises(ConfigError) as err:
            evaluate(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), cfg, OmegaConf.create({"name": "digits"}), torch.device("cpu"))
        assert f"metrics.ref={tmp_path / name}" in str(err.value) and fragment in str(err.value), (name, str(err.value))
    np.savez(tmp_path / "other_detector.npz", mu=np.zeros(5), sigma=np.eye(5))  # statistics of another detector
    cfg = _metrics_cfg(tmp_path, ref=str(tmp_path / "other_detector.npz"), names=["fid"], fid_min_samples=0)
    with pytest.raises(ConfigError, match="other_detector.npz has 5-dim statistics, the torchscript detector gives 12-dim"):
        evaluate(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), cfg, OmegaConf.create({"name": "digits"}), torch.device("cpu"))


def _idx_gz(path, arr):
    import gzip
    import struct

    with gzip.open(path, "wb") as f:
        f.write(b"\0\0\x08" + bytes([arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes())


def test_truncated_mnist_and_cifar_files_are_named(tmp_path):
    root = tmp_path / "mnist"
    root.mkdir()
    for prefix in ("train", "t10k"):
        _idx_gz(root / f"{prefix}-images-idx3-ubyte.gz", np.zeros((6, 28, 28), np.uint8))
        _idx_gz(root / f"{prefix}-labels-idx1-ubyte.gz", np.zeros(6, np.uint8))
    _cut(root / "train-images-idx3-ubyte.gz")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz' cannot be read \(a gzip-compressed file: Compressed "
                                        r"file ended .*re-download it"):  # fmt: skip
        build_dataset("mnist", root)
    cifar = tmp_path / "cifar" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(cifar / name, "wb") as f:  # the real batches' layout: a Python 2 era protocol-2 pickle of a dict
            pickle.dump({"data": np.zeros((4, 3072), np.uint8), "labels": [1, 2, 3, 4]}, f, protocol=2)
    _cut(cifar / "data_batch_4")
    with pytest.raises(DataError, match=r"data_batch_4' is not a CIFAR-10 python batch \(it is a Python pickle .*truncated"):
        build_dataset("cifar10", tmp_path / "cifar")


@pytest.mark.parametrize("content, fragment", [
    (None, "is a PNG image, not a YAML or JSON mixture file"),
    ("means: [[0, 1], [2]]\n", "means must be a number or a rectangular (nested) list of numbers, got '[[0, 1], [2]]'"),
    ("means: [[0, 1]]\nscales: wide\n", "scales must be a number or a rectangular (nested) list of numbers, got 'wide'"),
    ("means: [[0, 1]]\nseed: abc\n", "seed must be an integer"),
])
def test_mixture_file_of_the_wrong_structure_is_named(tmp_path, content, fragment):
    from diffctl.networks.gmm import GaussianMixture

    path = tmp_path / "mixture.yaml"
    if content is None:
        Image.new("RGB", (2, 2)).save(path, format="PNG")
    else:
        path.write_text(content)
    with pytest.raises(ConfigError) as err:
        GaussianMixture.from_config({"file": str(path)})
    assert f"model.file {path}" in str(err.value) and fragment in str(err.value)


# ---------------------------------------------------------------- image folders


def _load_one(tmp_path, img, channels, name="img.png", **save):
    """The training tensor of one image file written by PIL (flat folder, native resolution)."""
    import tempfile
    from pathlib import Path

    root = Path(tempfile.mkdtemp(dir=tmp_path))  # a folder of its own
    img.save(root / name, **save)
    x = build_dataset("imagefolder", root, resolution=img.size[0], channels=channels)[0]["image"]
    return x.numpy().astype(np.float64)


def _as_data(rgb8):
    """uint8 HxW(xC) -> the [-1, 1] CHW range the data pipeline yields."""
    a = np.asarray(rgb8, np.float64)
    return (a[None] if a.ndim == 2 else a.transpose(2, 0, 1)) / 127.5 - 1


def test_16_bit_png_keeps_its_bit_depth(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, (8, 8), dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    expected = values.astype(np.float64) / 65535 * 2 - 1  # 0 -> -1, 65535 -> 1
    gray = _load_one(tmp_path, img, 1)
    np.testing.assert_allclose(gray[0], expected, atol=1e-6)
    assert (gray >= 1).mean() < 0.01  # not saturated (PIL's convert("L") made ~all of these 255)
    rgb = _load_one(tmp_path, img, 3)
    np.testing.assert_allclose(rgb, np.broadcast_to(expected, (3, 8, 8)), atol=1e-6)
    # resized, it agrees with the same picture at 8 bits (its high bytes), up to the 8-bit rounding
    big = Image.fromarray(np.kron(values, np.ones((4, 4), np.uint16)))
    root = tmp_path / "big"
    root.mkdir()
    big.save(root / "a.png")
    Image.fromarray((np.asarray(big) >> 8).astype(np.uint8)).save(root / "b.png")
    ds = build_dataset("imagefolder", root, resolution=8, channels=1)
    sixteen, eight = ds[0]["image"].numpy(), ds[1]["image"].numpy()
    assert np.abs(sixteen - eight).max() < 3 / 127.5 and (sixteen >= 1).mean() < 0.05


def test_every_8_bit_mode_is_converted_as_its_pixels_mean(tmp_path):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (4, 4), dtype=np.uint8)
    gray = rgb[..., 0]
    # bilevel: 0 / 255
    bits = rng.integers(0, 2, (4, 4)).astype(bool)
    np.testing.assert_allclose(_load_one(tmp_path, Image.fromarray(bits), 1), _as_data(bits * 255), atol=1e-6)
    # palette: through the palette; a transparent entry is black
    palette = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    index = rng.integers(0, 4, (4, 4), dtype=np.uint8)
    pal = Image.new("P", (4, 4))
    pal.putdata(index.ravel().tolist())
    pal.putpalette(palette.ravel().tolist())
    np.testing.assert_allclose(_load_one(tmp_path, pal, 3), _as_data(palette[index]), atol=1e-6)
    transparent = np.where((index == 2)[..., None], 0, palette[index])
    np.testing.assert_allclose(_load_one(tmp_path, pal, 3, "t.png", transparency=2), _as_data(transparent), atol=1e-6)
    # alpha: composited over black (the premultiplied colour), not dropped
    over = lambda c, a: np.rint(c.astype(np.float64) * a / 255)  # noqa: E731
    rgba = Image.fromarray(np.dstack([rgb, alpha]))
    np.testing.assert_allclose(_load_one(tmp_path, rgba, 3), _as_data(over(rgb, alpha[..., None])), atol=1e-6)
    la = Image.fromarray(np.dstack([gray, alpha]))
    np.testing.assert_allclose(_load_one(tmp_path, la, 1), _as_data(over(gray, alpha)), atol=1e-6)
    opaque = Image.fromarray(np.dstack([rgb, np.full_like(alpha, 255)]))
    np.testing.assert_allclose(_load_one(tmp_path, opaque, 3, "o.png"), _as_data(rgb), atol=1e-6)
    # CMYK (TIFF): r = (255 - c)(255 - k) / 255, rounded, as Pillow defines it
    cmyk = rng.integers(0, 256, (4, 4, 4), dtype=np.uint8)
    want = np.rint((255 - cmyk[..., :3].astype(np.float64)) * (255 - cmyk[..., 3:].astype(np.float64)) / 255)
    got = _load_one(tmp_path, Image.frombytes("CMYK", (4, 4), cmyk.tobytes()), 3, "c.tif")
    assert np.abs(got - _as_data(want)).max() <= 1 / 127.5 + 1e-6


def test_int_and_float_images_are_scaled_or_refused_naming_the_file(tmp_path):
    values = np.arange(16, dtype=np.int32).reshape(4, 4) * 4000  # 0..60000: 16-bit data in a 32-bit TIFF
    got = _load_one(tmp_path, Image.fromarray(values), 1, "i.tif")
    np.testing.assert_allclose(got[0], values / 65535 * 2 - 1, atol=1e-6)
    floats = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    np.testing.assert_allclose(_load_one(tmp_path, Image.fromarray(floats), 3, "f.tif"),
                               np.broadcast_to(floats * 2.0 - 1, (3, 4, 4)), atol=1e-6)  # fmt: skip
    for name, img, fragment in [("wide.tif", Image.fromarray(values * 100), "32-bit integer pixels in [0, 6000000]"),
                                ("hdr.tif", Image.fromarray(floats * 4), "floating-point pixels in [0, 4]")]:  # fmt: skip
        with pytest.raises(ImageFileError, match="save it as 8- or 16-bit") as err:
            _load_one(tmp_path, img, 3, name)
        assert name in str(err.value) and fragment in str(err.value)


@pytest.mark.parametrize("damage", ["cut short", "text renamed .png"])
def test_an_image_that_cannot_be_decoded_is_named(tmp_path, damage):
    root = tmp_path / "images"
    root.mkdir()
    bad = root / "b.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(bad)
    if damage == "cut short":
        _cut(bad, 0.6)
    else:
        bad.write_text("not an image\n")
    with pytest.raises(ImageFileError) as err:
        build_dataset("imagefolder", root, resolution=8)[0]
    what = "a PNG image): image file is truncated" if damage == "cut short" else "a text file (beginning 'not an image'))"
    assert f"cannot read image {bad} ({what}" in str(err.value) and "replace or remove that file" in str(err.value)


def test_a_truncated_image_in_training_is_one_line_from_a_dataloader_worker(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(16):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / f"{i:02d}.png")
    _cut(root / "07.png", 0.5)
    tiny = [o for o in tiny_overrides("unet") if not o.startswith("data")]
    args = ["train", *tiny, "data=imagefolder", f"data.root={root}", "data.resolution=8", "data.batch_size=16",
            "data.num_workers=1", f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    out = run_cli(args, tmp_path)
    _assert_user_error(out, f"cannot read image {root / '07.png'} (a PNG image): image file is truncated; replace or remove that file")


# ---------------------------------------------------------------- sample resume shards

GMM = ["model=gmm", "model.conditional=true", "model.num_components=3", "steps=2", "num_samples=6", "batch_size=2",
       "progress_bar=false"]  # fmt: skip


def _no_sampling(monkeypatch):
    import diffctl.generation as generation  # where sample() calls the sampler

    def generate(*args, **kwargs):
        raise AssertionError("a new sample was made before the shards were checked")

    real = generation.generate
    monkeypatch.setattr(generation, "generate", generate)
    return real


def test_resume_checks_every_shard_before_making_a_sample(tmp_path, monkeypatch):
    import diffctl.generation as generation  # where sample() calls the sampler

    run = tmp_path / "run"
    shards = interrupted_run(run, GMM, 2, monkeypatch)
    assert [p.name for p in shards] == ["shard-0000000000-0000000002.npz", "shard-0000000002-0000000004.npz"]
    other = interrupted_run(tmp_path / "other", [*GMM, "class_label=1"], 1, monkeypatch)[0]  # another run's shard
    flat3 = interrupted_run(tmp_path / "flat3", [*GMM, "model.shape=[3]"], 1, monkeypatch)[0]
    second = shards[1].read_bytes()
    with np.load(shards[1]) as z:
        arrays = dict(z)
    cases = [
        (lambda: _cut(shards[1]), "is a zip archive cut short or damaged"),
        (lambda: shards[1].write_bytes(other.read_bytes()), "holds class labels [1, 1]... that are not this run's ([2, 0]..."),
        (lambda: shards[1].write_bytes(flat3.read_bytes()), "holds float32 samples of shape [2, 3], this run makes float32 [2, 2]"),
        (lambda: np.savez(shards[1], **{**arrays, "samples": arrays["samples"].astype(np.float64)}),
         "holds float64 samples of shape [2, 2], this run makes float32 [2, 2]"),
        (lambda: Image.new("L", (2, 2)).save(shards[1], format="PNG"), "is a PNG image, not a .npz shard"),
    ]
    for damage, fragment in cases:
        damage()
        real = _no_sampling(monkeypatch)
        with pytest.raises(ConfigError) as err:
            run_sample(tmp_path / "log", [f"resume={run}"])
        monkeypatch.setattr(generation, "generate", real)
        assert f"resume: shard {shards[1]} {fragment}" in str(err.value), str(err.value)
        assert "delete that file to have its samples made again" in str(err.value)
        shards[1].write_bytes(second)
    moved = run / "partial" / "shard-0000000010-0000000012.npz"
    shards[1].rename(moved)
    with pytest.raises(ConfigError, match=r"named for samples 10..11, outside this run's num_samples=6"):
        run_sample(tmp_path / "log", [f"resume={run}"])
    moved.unlink()  # what the message says: delete it, and resume makes those samples again
    result = run_sample(tmp_path / "log", [f"resume={run}"])
    assert result["resumed_samples"] == 2
    run_sample(tmp_path / "whole", GMM)
    np.testing.assert_array_equal(np.load(run / "samples.npz")["samples"], np.load(tmp_path / "whole" / "samples.npz")["samples"])


def test_shards_are_whole_or_absent_and_a_bad_one_is_one_line_from_the_cli(tmp_path, monkeypatch):
    run = tmp_path / "run"
    interrupted_run(run, GMM, 1, monkeypatch)
    import diffctl.indexjob as indexjob  # where the shards are written

    real_savez = np.savez

    def killed_mid_write(file, **arrays):  # the process dies with half a shard written
        real_savez(file, **arrays)
        file.truncate(file.tell() // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(indexjob.np, "savez", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        run_sample(tmp_path / "log", [f"resume={run}"])
    monkeypatch.setattr(indexjob.np, "savez", real_savez)
    assert sorted(p.name for p in (run / "partial").iterdir()) == ["manifest.json", "shard-0000000000-0000000002.npz"]
    shard = run / "partial" / "shard-0000000000-0000000002.npz"
    _cut(shard)  # damaged anyway (a disk error, a copy cut short): named, nothing made
    (run / "partial" / ".shard-0000000002-0000000004.npz.99999.tmp").write_bytes(b"PK\x03\x04")  # a temporary: ignored
    out = run_cli(["sample", f"resume={run}", "progress_bar=false"], tmp_path)
    _assert_user_error(out, f"resume: shard {shard} is a zip archive cut short", "delete that file to have its samples made again")
    assert not (run / "samples.npz").exists() and len(list((run / "partial").glob("shard-*"))) == 1


def test_a_damaged_run_config_or_manifest_is_named(tmp_path, monkeypatch):
    run = tmp_path / "run"
    interrupted_run(run, GMM, 1, monkeypatch)
    manifest = run / "partial" / "manifest.json"
    manifest.write_text("{cut")
    with pytest.raises(ConfigError, match=rf"resume: {manifest} is not the JSON manifest diffctl wrote"):
        run_sample(tmp_path / "log", [f"resume={run}"])
    config = run / ".hydra" / "config.yaml"
    Image.new("L", (2, 2)).save(config, format="PNG")
    with pytest.raises(ConfigError, match=rf"resume={run}: {config} is a PNG image, not the run config diffctl wrote"):
        run_sample(tmp_path / "log", [f"resume={run}"])
