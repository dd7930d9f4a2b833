"""LPIPS with backbone weights from a local file (diffctl/lpips.py), against the `lpips` package
(Zhang et al.'s own code) as the oracle. Nothing downloads here, so the backbones are untrained
torchvision networks saved by the test; the oracle loads the same file through torchvision's own
weight loading (the torch hub cache, TORCH_HOME), not through diffctl's key mapping."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import run_cli
from test_inpaint_command import FAST, run_inpaint

from diffctl.errors import ConfigError
from diffctl.image_sources import read_images
from diffctl.lpips import LPIPS, backbone_of

ORACLE_NET = {"squeezenet1_1": "squeeze", "alexnet": "alex", "vgg16": "vgg"}
WEIGHTS = {"squeezenet1_1": torchvision.models.SqueezeNet1_1_Weights, "alexnet": torchvision.models.AlexNet_Weights}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """{net: file} of untrained torchvision backbones saved under torchvision's release file names in
    a torch hub cache, so both diffctl (by path) and the oracle (through torchvision) read them."""
    home = tmp_path_factory.mktemp("torch_home")
    cache = home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    files = {}
    for i, (net, weights) in enumerate(WEIGHTS.items()):
        torch.manual_seed(i)
        model = getattr(torchvision.models, net)(weights=None)
        files[net] = cache / os.path.basename(weights.DEFAULT.url)
        torch.save(model.state_dict(), files[net])
    return home, files


def oracle(hub, monkeypatch, net, spatial=False):
    import lpips  # Zhang et al.'s package (the test extra); after diffctl, whose shim torchvision needs on CPU

    monkeypatch.setenv("TORCH_HOME", str(hub[0]))
    with pytest.warns(UserWarning):  # torchvision's deprecation of lpips's `pretrained=True`
        return lpips.LPIPS(net=ORACLE_NET[net], spatial=spatial, verbose=False).eval()


def images(n, size, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g) * 2 - 1


@pytest.mark.parametrize("net", ["squeezenet1_1", "alexnet"])
def test_equals_the_lpips_package(hub, monkeypatch, net):
    a, b = images(4, 64), images(4, 64, seed=1)
    ours = LPIPS(hub[1][net], resize=None)
    assert ours.backbone == net
    with torch.no_grad():
        expected = oracle(hub, monkeypatch, net)(a, b).flatten()
    torch.testing.assert_close(ours.scores(a, b), expected, rtol=1e-5, atol=1e-6)
    assert float(ours.scores(a, a).abs().max()) < 1e-6  # a distance: zero on equal images


def test_masked_is_the_spatial_map_over_the_region(hub, monkeypatch):
    a, b = images(3, 64), images(3, 64, seed=1)
    region = (torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(2)) > 0.6).float()
    with torch.no_grad():
        spatial = oracle(hub, monkeypatch, "squeezenet1_1", spatial=True)(a, b)  # [N, 1, H, W]
    expected = (spatial * region).sum((1, 2, 3)) / region.sum((1, 2, 3))
    torch.testing.assert_close(LPIPS(hub[1]["squeezenet1_1"], resize=None).scores(a, b, region), expected, rtol=1e-5, atol=1e-6)


def test_small_gray_images_are_resized_and_repeated(hub, monkeypatch):
    a, b = images(2, 16, channels=1), images(2, 16, channels=1, seed=1)
    up = [F.interpolate(x.expand(-1, 3, -1, -1), size=(64, 64), mode="bilinear", align_corners=False) for x in (a, b)]
    with torch.no_grad():
        expected = oracle(hub, monkeypatch, "alexnet")(*up).flatten()
    torch.testing.assert_close(LPIPS(hub[1]["alexnet"], resize=64).scores(a, b), expected, rtol=1e-4, atol=1e-6)


def test_backbone_is_recognised_from_the_keys():
    with torch.device("meta"):  # shapes only, no memory
        state = {net: getattr(torchvision.models, net)(weights=None).state_dict()
                 for net in ("alexnet", "vgg16", "squeezenet1_1", "vgg19", "vgg16_bn", "squeezenet1_0")}  # fmt: skip
    assert [backbone_of(state[n]) for n in ("alexnet", "vgg16", "squeezenet1_1")] == ["alexnet", "vgg16", "squeezenet1_1"]
    assert [backbone_of(state[n]) for n in ("vgg19", "vgg16_bn", "squeezenet1_0")] == [None, None, None]


def test_foreign_or_broken_files_are_one_line_errors(hub, tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    other = tmp_path / "other.pth"
    torch.save({"features.0.weight": torch.zeros(16, 3, 5, 5)}, other)
    partial = tmp_path / "partial.pth"
    state = torch.load(hub[1]["squeezenet1_1"], weights_only=True)
    torch.save({k: v for k, v in state.items() if not k.startswith("features.12.")}, partial)
    cases = {tmp_path / "missing.pth": "no such file", text: "not a readable weights file", other: "not the weights of",
             partial: "without features.12"}  # fmt: skip
    for path, message in cases.items():
        with pytest.raises(ConfigError, match=message) as e:
            LPIPS(path)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="too small for LPIPS's alexnet; set lpips_resize=64"):
        LPIPS(hub[1]["alexnet"], resize=None).check_size(8, 8)


def test_inpaint_reports_lpips_of_the_saved_images(trained, hub, monkeypatch, tmp_path):
    _, run_dir = trained
    run_inpaint(tmp_path, [f"ckpt={run_dir}", *FAST, "limit=3", "mask=center", f"lpips={hub[1]['squeezenet1_1']}"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    with np.load(tmp_path / "inpainted.npz") as z:
        result = torch.from_numpy(z["samples"]).permute(0, 3, 1, 2).double().div(127.5).sub(1).float()
        unknown = torch.from_numpy(z["masks"] == 0)[:, None].float()
    original = read_images("digits:test", limit=3).images
    up = [F.interpolate(x.expand(-1, 3, -1, -1), size=(64, 64), mode="bilinear", align_corners=False) for x in (result, original)]
    with torch.no_grad():
        whole = oracle(hub, monkeypatch, "squeezenet1_1")(*up).flatten()
    assert metrics["lpips_backbone"] == "squeezenet1_1" and "notes" not in metrics
    assert metrics["lpips"] == pytest.approx(float(whole.mean()), rel=1e-4)
    assert 0 < metrics["lpips_masked"] and metrics["lpips_masked"] != metrics["lpips"]
    assert float(unknown.sum()) > 0


def test_inpaint_without_lpips_says_why(trained, tmp_path):
    _, run_dir = trained
    run_inpaint(tmp_path, [f"ckpt={run_dir}", *FAST, "limit=1", "method=replace"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["lpips"] is None and metrics["lpips_masked"] is None
    assert "LPIPS not computed: give lpips=" in metrics["notes"]


def test_inpaint_refuses_a_bad_lpips_file_before_any_work(trained, tmp_path):
    _, run_dir = trained
    out = tmp_path / "run"
    proc = run_cli(["inpaint", f"ckpt={run_dir}", *FAST, "limit=1", f"lpips={tmp_path / 'nope.pth'}", f"hydra.run.dir={out}"], tmp_path)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: lpips=") and "no such file" in proc.stderr
    assert not (out / "inpainted.npz").exists() and not (out / "partial").exists()
