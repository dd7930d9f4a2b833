"""`diffctl sample source=...` on a tiny image-to-image checkpoint (condition=sr, 8x8 digits, factor 2,
trained for 2 steps: a wiring test, not a quality one): the outputs, the metrics against numpy
computations from the saved files, independence of batch size and processes, sources without
targets, per-index inpainting masks, guidance on the null source and the one-line refusals."""

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import compose_train, interrupted_run, run_cli, run_sample, run_train, tiny_overrides
from PIL import Image

from diffctl.errors import ConfigError
from diffctl.image_conditions import SOURCE, Colorization, Inpainting, SuperResolution
from diffctl.masks import random_mask

FAST = ["steps=3", "metrics.names=[]", "trainer.accelerator=cpu"]


@pytest.fixture(scope="module")
def sr_run(tmp_path_factory):
    """A tiny sr checkpoint whose null source was trained (condition.dropout > 0, for guidance)."""
    run = tmp_path_factory.mktemp("sr") / "run"
    run_train(run, [*tiny_overrides(), "trainer.max_steps=2", "condition=sr", "condition.dropout=0.2"])
    return run


def _load(out):
    with np.load(out / "samples.npz") as z:
        arrays = {k: z[k] for k in z.files}
    return arrays, json.loads((out / "metrics.json").read_text())


def _pm1(a):
    return a.astype(np.float64) / 127.5 - 1


def _psnr(out, target):
    """Mean over images of 10 log10(2^2 / MSE), images in [-1, 1]."""
    mse = ((_pm1(out) - _pm1(target)) ** 2).reshape(len(out), -1).mean(1)
    return float(np.mean(10 * np.log10(4 / mse)))


def _ssim(out, target):
    """SSIM (Wang et al. 2004) with torchmetrics' conventions, written out in numpy: an 11x11
    Gaussian window of std 1.5, reflection-padded borders, K1 = 0.01, K2 = 0.03, data range 2; the
    mean over pixels and channels, then over images."""
    d = np.arange(11) - 5
    g = np.exp(-((d / 1.5) ** 2) / 2)
    g /= g.sum()
    k = np.outer(g, g)
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    scores = []
    for a, b in zip(_pm1(out), _pm1(target)):  # [H, W, C]
        h, w = a.shape[:2]

        def blur(x):
            p = np.pad(x, ((5, 5), (5, 5), (0, 0)), mode="reflect")
            return sum(k[i, j] * p[i : i + h, j : j + w] for i in range(11) for j in range(11))

        ma, mb = blur(a), blur(b)
        va, vb = np.maximum(blur(a * a) - ma**2, 0), np.maximum(blur(b * b) - mb**2, 0)
        cov = blur(a * b) - ma * mb
        scores.append((((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))).mean())
    return float(np.mean(scores))


def _consistency(out, low):
    """mean |downsample(output) - low| from saved uint8 arrays, with the checkpoint's bicubic
    downsampling (its match with PIL's is tested in test_image_conditions.py)."""
    x = torch.from_numpy(_pm1(out)).permute(0, 3, 1, 2).float()
    lo = torch.from_numpy(_pm1(low)).permute(0, 3, 1, 2).float() if low.dtype == np.uint8 else low
    return float((SuperResolution(1, 8, factor=2).downsample(x) - lo).abs().mean())


def test_targets_give_outputs_grid_and_metrics_of_the_saved_files(sr_run, tmp_path):
    result = run_sample(tmp_path, [f"ckpt={sr_run}", "source=digits:test", "num_samples=5", "batch_size=2", *FAST])
    arrays, metrics = _load(tmp_path)
    assert arrays["samples"].shape == arrays["sources"].shape == arrays["targets"].shape == (5, 8, 8, 1)
    assert all(a.dtype == np.uint8 for a in arrays.values())
    from diffctl.image_sources import read_images
    from diffctl.images import to_uint8

    targets = to_uint8(read_images("digits:test", limit=5).images)
    np.testing.assert_array_equal(arrays["targets"], targets.numpy())
    sr = SuperResolution(1, 8, factor=2)
    shown = to_uint8(sr.source(torch.from_numpy(_pm1(arrays["targets"])).permute(0, 3, 1, 2).float(), None)).numpy()
    np.testing.assert_array_equal(arrays["sources"], shown)  # the training degradation of each target
    grid = np.asarray(Image.open(tmp_path / "samples.png"))
    assert grid.shape[1] > 3 * grid.shape[0]  # 5 images, 4 triplets a row: 12 tiles wide, 2 high
    assert metrics["num_samples"] == 5 and metrics["source_kind"] == "targets" and metrics["condition"] == "sr"
    assert metrics["psnr"] == pytest.approx(_psnr(arrays["samples"], arrays["targets"]), rel=1e-6)
    assert metrics["ssim"] == pytest.approx(_ssim(arrays["samples"], arrays["targets"]), rel=1e-6, abs=1e-9)
    low = sr.downsample(torch.from_numpy(_pm1(arrays["targets"])).permute(0, 3, 1, 2).float())
    assert metrics["consistency"] == pytest.approx(_consistency(arrays["samples"], low), rel=1e-5)
    assert metrics["lpips"] is None and "LPIPS not computed" in metrics["notes"]
    assert result["nfe_per_sample"] == 3 and not (tmp_path / "partial").exists()


def test_same_outputs_for_any_batch_size_and_number_of_processes(sr_run, tmp_path):
    common = [f"ckpt={sr_run}", "source=digits:test", "num_samples=5", *FAST]
    run_sample(tmp_path / "a", [*common, "batch_size=1"])
    run_sample(tmp_path / "b", [*common, "batch_size=3"])
    run_sample(tmp_path / "c", [*common, "batch_size=2", "trainer.devices=2"])
    (a, ma), (b, _), (c, mc) = _load(tmp_path / "a"), _load(tmp_path / "b"), _load(tmp_path / "c")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
        np.testing.assert_array_equal(a[key], c[key])
    assert mc["devices"] == 2 and ma["psnr"] == mc["psnr"]
    seeded = run_sample(tmp_path / "d", [*common, "batch_size=5", "seed=1"])
    assert not np.array_equal(_load(tmp_path / "d")[0]["samples"], a["samples"]) and seeded["seed"] == 1


def test_low_resolution_sources_in_an_npz_or_a_folder(sr_run, tmp_path):
    low = np.random.default_rng(0).integers(0, 256, (3, 4, 4, 1), dtype=np.uint8)
    np.savez(tmp_path / "low.npz", samples=low)
    folder = tmp_path / "lowpng"
    folder.mkdir()
    for i, im in enumerate(low):
        Image.fromarray(im[..., 0]).save(folder / f"{i}.png")
    run_sample(tmp_path / "n", [f"ckpt={sr_run}", f"source={tmp_path / 'low.npz'}", *FAST])
    run_sample(tmp_path / "f", [f"ckpt={sr_run}", f"source={folder}", "batch_size=2", *FAST])
    (n, mn), (f, _) = _load(tmp_path / "n"), _load(tmp_path / "f")
    assert "targets" not in n and n["samples"].shape == n["sources"].shape == (3, 8, 8, 1)
    np.testing.assert_array_equal(n["samples"], f["samples"])  # the same low-resolution images
    up = SuperResolution(1, 8, factor=2).upsample(torch.from_numpy(_pm1(low)).permute(0, 3, 1, 2).float())
    from diffctl.images import to_uint8

    np.testing.assert_array_equal(n["sources"], to_uint8(up).numpy())  # upsampled as in training
    assert mn["source_kind"] == "sources" and mn["psnr"] is None and mn["ssim"] is None
    assert mn["consistency"] == pytest.approx(_consistency(n["samples"], low), rel=1e-5)
    assert "no PSNR, SSIM or LPIPS" in mn["notes"]


def test_guidance_uses_the_trained_null_source(sr_run, tmp_path, monkeypatch):
    """guidance= runs the network on each source and on the null (all-zero) one: a 2-step network
    barely depends on its source, so the calls are checked rather than the images."""
    from diffctl.conditioning import Conditioner

    seen = []
    concat = Conditioner.concat

    def spy(self, conds):
        seen.append([c[SOURCE].clone() for c in conds])
        return concat(self, conds)

    monkeypatch.setattr(Conditioner, "concat", spy)
    common = [f"ckpt={sr_run}", "source=digits:test", "num_samples=2", "batch_size=2", *FAST]
    guided = run_sample(tmp_path / "guided", [*common, "guidance=3"])
    assert guided["guidance"] == 3.0 and guided["nfe_per_sample"] == 3  # both halves in one network call
    assert len(seen) == 3  # once per step
    arrays, _ = _load(tmp_path / "guided")
    sources = SuperResolution(1, 8, factor=2).source(torch.from_numpy(_pm1(arrays["targets"])).permute(0, 3, 1, 2).float(), None)
    for cond, null in seen:
        torch.testing.assert_close(cond, sources, rtol=0, atol=1e-6)
        assert torch.equal(null, torch.zeros_like(cond))


def test_guidance_without_a_null_source_is_refused(sr_run, tmp_path):
    from diffctl.build import resolve_weights
    from diffctl.sample_checks import check_fits
    from diffctl.source import load_source

    cfg = compose_train(tmp_path, [f"ckpt={sr_run}", "source=digits:test", "guidance=2", *FAST], config_name="sample")
    source = load_source(cfg, str(resolve_weights(sr_run)))
    check_fits(cfg, source)  # trained with condition.dropout=0.2: accepted
    denoiser = SimpleNamespace(capabilities=dataclasses.replace(source.denoiser.capabilities, null_condition=False),
                               conditioner=source.denoiser.conditioner)  # fmt: skip
    with pytest.raises(ConfigError, match=r"guidance needs an image-to-image checkpoint trained with condition.dropout > 0"):
        check_fits(cfg, dataclasses.replace(source, denoiser=denoiser))


def test_inpainting_masks_are_keyed_per_image_index():
    x = torch.rand(6, 1, 16, 16) * 2 - 1
    cond = Inpainting(1, 16)
    whole = cond.sources(x, 0, 7)
    for j in range(6):
        np.testing.assert_array_equal(whole[j, 1].numpy(), random_mask(16, 16, 7, j).astype(np.float32))
    torch.testing.assert_close(cond.sources(x[2:5], 2, 7), whole[2:5], rtol=0, atol=0)  # any batching
    assert not torch.equal(cond.sources(x, 0, 8)[:, 1], whole[:, 1])  # the seed changes them
    torch.testing.assert_close(whole[:, :1], x * whole[:, 1:], rtol=0, atol=0)
    gray = Colorization(3, 8)
    assert gray.given_shape() == (1, 8, 8) and Inpainting(1, 8).given_shape() is None
    rgb = torch.rand(3, 3, 8, 8) * 2 - 1
    torch.testing.assert_close(gray.sources(rgb, 5, 0), gray.source(rgb, None))  # deterministic: no seed, no index


def _cli_error(args, tmp_path, message):
    out = tmp_path / "out"
    proc = run_cli(["sample", *args, *FAST, f"hydra.run.dir={out}"], tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], lines[-1]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not any(out.glob("samples.*")) and not (out / "metrics.json").exists() and not (out / "partial").exists()


def test_bad_sources_are_one_line_errors_before_any_work(sr_run, trained, tmp_path):
    big = tmp_path / "big.npz"
    np.savez(big, samples=np.zeros((2, 16, 16, 1), dtype=np.uint8))
    _cli_error([f"ckpt={sr_run}"], tmp_path, f"ckpt={sr_run / 'checkpoints' / 'last.ckpt'} is an image-to-image model "
               "(condition=sr): give source=<dataset:split | folder | .npz>")  # fmt: skip
    _cli_error([f"ckpt={sr_run}", f"source={big}"], tmp_path,
               "has 16x16 1-channel images; ")  # fmt: skip
    _cli_error([f"ckpt={trained[1]}", "source=digits:test"], tmp_path, "source= applies to image-to-image checkpoints")


def test_wrong_size_names_the_sizes_that_work(sr_run, tmp_path):
    from diffctl.build import resolve_weights
    from diffctl.img2img_job import read_sources
    from diffctl.source import load_source

    np.savez(tmp_path / "rgb.npz", samples=np.zeros((2, 8, 8, 3), dtype=np.uint8))
    cfg = compose_train(tmp_path, [f"ckpt={sr_run}", f"source={tmp_path / 'rgb.npz'}", *FAST], config_name="sample")
    source = load_source(cfg, str(resolve_weights(sr_run)))
    with pytest.raises(ConfigError, match=r"8x8 3-channel images; .* takes 8x8 1-channel images \(the targets.*or 4x4 1-channel") as err:
        read_sources(cfg, source)
    assert "\n" not in str(err.value)
    assert SOURCE in source.denoiser.capabilities.conditions


def test_resume_gives_the_uninterrupted_output(sr_run, tmp_path, monkeypatch):
    """A run stopped after one batch of 2, resumed with batch_size=1, writes what an uninterrupted run does."""
    common = [f"ckpt={sr_run}", "source=digits:test", "num_samples=5", *FAST]
    run = tmp_path / "run"
    interrupted_run(run, [*common, "batch_size=2"], 1, monkeypatch, "sample-source")
    assert len(list((run / "partial").glob("shard-*.npz"))) == 1 and not (run / "samples.npz").exists()
    result = run_sample(tmp_path / "log", [f"resume={run}", "batch_size=1"])
    assert result["resumed_samples"] == 2
    run_sample(tmp_path / "whole", [*common, "batch_size=5"])
    (resumed, _), (whole, _) = _load(run), _load(tmp_path / "whole")
    for key in whole:
        np.testing.assert_array_equal(resumed[key], whole[key])
    assert not (run / "partial").exists()


def test_colorize_reads_gray_images_as_sources_and_rgb_ones_as_targets(tmp_path):
    """read_sources for a colorize model (a stand-in Source: no RGB dataset is trained on here)."""
    from diffctl.img2img_job import read_sources

    rgb = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", samples=rgb)
    gray = tmp_path / "gray"
    gray.mkdir()
    for i, im in enumerate(rgb):
        Image.fromarray(im).convert("L").save(gray / f"{i}.png")
    model = SimpleNamespace(conditioner=Colorization(3, 8))
    source = SimpleNamespace(shape=(3, 8, 8), denoiser=model, description="colorize.ckpt")
    cfg = compose_train(tmp_path, [f"source={tmp_path / 'rgb.npz'}", *FAST], config_name="sample")
    targets = read_sources(cfg, source)
    assert targets.kind == "targets" and targets.given is None and targets.targets.shape == (3, 3, 8, 8)
    cfg.source = str(gray)
    sources = read_sources(cfg, source)
    assert sources.kind == "sources" and sources.targets is None and sources.shown.shape == (3, 3, 8, 8)
    pil = torch.from_numpy(np.stack([np.asarray(Image.open(gray / f"{i}.png")) for i in range(3)])[:, None] / 127.5 - 1)
    torch.testing.assert_close(sources.cond.double(), pil, rtol=0, atol=1e-6)  # the gray files themselves
    assert (targets.cond - sources.cond).abs().max() <= 1.01 / 127.5  # our luma of the RGB targets: PIL's within a level


def test_lpips_of_the_saved_outputs_against_their_targets(sr_run, tmp_path):
    """lpips= with an untrained squeezenet1_1 file: diffctl.lpips (tested against the lpips package in
    test_lpips.py) on the saved uint8 files gives metrics.json's figure."""
    import torchvision

    from diffctl.lpips import LPIPS

    torch.manual_seed(0)
    weights = tmp_path / "squeezenet1_1-b8a52dc0.pth"
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), weights)
    run_sample(tmp_path / "out", [f"ckpt={sr_run}", "source=digits:test", "num_samples=3", f"lpips={weights}", *FAST])
    arrays, metrics = _load(tmp_path / "out")
    out, target = (torch.from_numpy(_pm1(arrays[k])).permute(0, 3, 1, 2).float() for k in ("samples", "targets"))
    assert metrics["lpips_backbone"] == "squeezenet1_1" and "notes" not in metrics and metrics["lpips_resize"] == 64
    assert metrics["lpips"] == pytest.approx(float(LPIPS(weights, 64).scores(out, target).mean()), rel=1e-4)


class _TinyDetector(torch.nn.Module):
    """A fixed random conv net: uint8 [B, 3, H, W] -> 16 pooled features (torchscript detector)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x: torch.Tensor):
        return torch.nn.functional.adaptive_avg_pool2d(torch.tanh(self.conv(x.float() / 127.5 - 1)), 2).flatten(1)


def _fid(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance of two feature sets (more rows than columns), with scipy's matrix square root."""
    from scipy import linalg

    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(s1 @ s2).real
    d = a.mean(0) - b.mean(0)
    return float(d @ d + np.trace(s1 + s2 - 2 * root))


def test_fid_and_kid_are_of_the_outputs_against_their_targets(sr_run, tmp_path):
    """source= with targets: FID's reference is the targets themselves (SR3/Palette's protocol), the
    figure equal to one computed from the saved outputs and targets with the detector and scipy; a
    metrics.ref given explicitly is still honoured."""
    detector = tmp_path / "tiny.pt"
    torch.jit.script(_TinyDetector()).save(str(detector))
    n = 24  # > 16 feature dimensions: full-rank covariances for scipy's square root
    scoring = ["metrics.names=[fid,kid,pr]", "metrics.detector=torchscript", f"metrics.detector_path={detector}",
               f"metrics.cache_dir={tmp_path / 'cache'}", "metrics.fid_min_samples=0", "metrics.kid_subsets=3",
               "metrics.kid_subset_size=8", "metrics.progress_bar=false", "steps=3", "trainer.accelerator=cpu"]  # fmt: skip
    run_sample(tmp_path / "out", [f"ckpt={sr_run}", "source=digits:test", f"num_samples={n}", *scoring])
    arrays, metrics = _load(tmp_path / "out")
    net = torch.jit.load(str(detector))

    def feats(a):  # uint8 NHWC gray -> features, gray repeated to RGB
        with torch.no_grad():
            return net(torch.from_numpy(a).permute(0, 3, 1, 2).expand(-1, 3, -1, -1)).double().numpy()

    assert metrics["ref"] == f"the {n} targets of source=digits:test" and metrics["ref_num_images"] == n
    assert metrics["fid"] == pytest.approx(_fid(feats(arrays["samples"]), feats(arrays["targets"])), rel=1e-4, abs=1e-7)
    assert metrics["kid_mean"] is not None
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    pr = calculate_precision_recall_full(*(torch.from_numpy(feats(arrays[k])) for k in ("samples", "targets")), neighborhood=3)
    assert (metrics["pr_precision"], metrics["pr_recall"]) == pytest.approx(pr, abs=1e-6)
    assert not (tmp_path / "cache" / "fid_refs").exists() or not any((tmp_path / "cache" / "fid_refs").iterdir())
    two = run_cli(["sample", f"ckpt={sr_run}", "source=digits:test", f"num_samples={n}", *scoring, "trainer.devices=2",
                   "progress_bar=false", f"hydra.run.dir={tmp_path / 'two'}"], tmp_path)  # fmt: skip
    assert two.returncode == 0, two.stderr[-2000:]
    _, split = _load(tmp_path / "two")  # each process embeds its share of the targets: the same figures
    assert split["fid"] == pytest.approx(metrics["fid"], rel=1e-5) and split["kid_mean"] == pytest.approx(metrics["kid_mean"], rel=1e-5)
    assert (split["pr_precision"], split["pr_recall"]) == (metrics["pr_precision"], metrics["pr_recall"])

    run_sample(tmp_path / "train_ref", [f"ckpt={sr_run}", "source=digits:test", f"num_samples={n}", "metrics.ref=digits:train", *scoring])
    _, other = _load(tmp_path / "train_ref")
    assert other["ref"].startswith("digits:train") and other["fid"] != metrics["fid"]


def test_memory_check_counts_the_source_channels(sr_run, tmp_path, monkeypatch):
    """The network of an image-to-image model takes C + extra channels: the sampling estimate runs
    it with them (with C alone its forward fails on the meta device and no activations are counted),
    and the sources and targets held on the host are counted; the training estimate likewise grows
    with the condition's channels."""
    import diffctl.memory as memory
    from diffctl.train import build_datamodule

    monkeypatch.setattr(memory, "available", lambda device: (64 * 2**10, "free in this test"))
    with pytest.raises(memory.MemoryRefused) as err:
        run_sample(tmp_path / "big", [f"ckpt={sr_run}", "source=digits:test", "num_samples=200", "batch_size=200", *FAST])
    line = str(err.value)
    assert "network activations" in line and "source images" in line and "\n" not in line, line
    assert not (tmp_path / "big" / "samples.npz").exists()

    shapes = []  # the training estimate runs the network it would build, on its input's channels

    def recording(net, batch, shape, num_classes, grad):
        shapes.append(tuple(shape))
        first = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
        assert first.in_channels == shape[0]
        return 0

    monkeypatch.setattr(memory, "available", lambda device: (2**40, "free in this test"))
    monkeypatch.setattr(memory, "network_bytes", recording)
    for condition in ("none", "inpaint"):  # inpaint: the masked image and the mask, C + 1 extra input channels
        cfg = compose_train(tmp_path / condition, [*tiny_overrides(), f"condition={condition}"])
        dm = build_datamodule(cfg)
        memory.check_train(cfg, dm, {"channels": dm.channels, "resolution": dm.resolution, "num_classes": 0})
    assert shapes == [(1, 8, 8), (3, 8, 8)], shapes


def _rgb_folder(path, n=20):
    """n random 8x8 RGB PNGs: an offline RGB dataset for condition=colorize (data=imagefolder)."""
    path.mkdir(parents=True)
    rgb = np.random.default_rng(3).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    for i, im in enumerate(rgb):
        Image.fromarray(im).save(path / f"{i:02d}.png")
    return path


@pytest.mark.parametrize("condition", ["inpaint", "colorize"])
def test_inpaint_and_colorize_checkpoints_sample_from_their_sources(condition, tmp_path):
    """Train, then `diffctl sample source=` end to end: the saved sources are the targets under image
    i's mask random_mask(H, W, seed, i) with the hole black (inpaint), or their PIL luma (colorize);
    PSNR and SSIM are those of the saved files."""
    data = ["data.random_flip=false"]
    if condition == "colorize":
        folder = _rgb_folder(tmp_path / "rgb")
        data += ["data=imagefolder", f"data.root={folder}", "data.resolution=8", "data.channels=3", "data.num_workers=0"]
    run_train(tmp_path / "run", [*tiny_overrides(), *data, "trainer.max_steps=2", f"condition={condition}"])
    source = "digits:test" if condition == "inpaint" else str(tmp_path / "rgb")
    run_sample(tmp_path / "out", [f"ckpt={tmp_path / 'run'}", f"source={source}", "num_samples=5", "seed=3", *FAST])
    arrays, metrics = _load(tmp_path / "out")
    target = arrays["targets"].astype(np.int64)
    assert arrays["samples"].shape == target.shape == (5, 8, 8, 1 if condition == "inpaint" else 3)
    if condition == "inpaint":
        known = np.stack([random_mask(8, 8, 3, i) for i in range(5)])[..., None].astype(bool)
        assert (~known).any() and known.any()
        np.testing.assert_array_equal(arrays["sources"], np.where(known, target, 0))
    else:
        gray = np.stack([np.asarray(Image.fromarray(t.astype(np.uint8)).convert("L")) for t in target])[..., None]
        assert np.abs(arrays["sources"].astype(np.int64) - gray).max() <= 1
        assert (arrays["sources"] == arrays["sources"][..., :1]).all()  # shown as gray RGB
    assert metrics["condition"] == condition and metrics["source_kind"] == "targets"
    assert metrics["psnr"] == pytest.approx(_psnr(arrays["samples"], arrays["targets"]), rel=1e-6)
    assert metrics["ssim"] == pytest.approx(_ssim(arrays["samples"], arrays["targets"]), rel=1e-5, abs=1e-6)
    assert "consistency" not in metrics
