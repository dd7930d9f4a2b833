"""`diffctl metrics`: FID, KID and Inception Score of any set of images against a reference set
(torch-fidelity's `fidelity`, EDM's `fid.py calc`), with what `diffctl sample` scores its samples
with: the same detectors, reference cache and process splitting (diffctl.metrics.evaluate), so the
numbers equal sample's on the same images and options. Writes metrics.json and prints a table.

images=: a folder of image files, an .npz (uint8 NHWC `samples`), a run directory of `diffctl sample`
or `diffctl inpaint` (its samples.npz or inpainted.npz) or <dataset>:<split>, read by
diffctl/image_sources.py. ref=: anything diffctl/references.py reads (a dataset split, a folder, an
.npz of images or of mu/sigma statistics). Every input problem is a one-line error before the
detector runs on the images.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from diffctl.detectors import Detector, load_detector, one_line
from diffctl.errors import ConfigError
from diffctl.image_sources import read_images
from diffctl.images import to_uint8
from diffctl.launch import device, launch
from diffctl.metrics import check_config, evaluate
from diffctl.references import ref_source, reference
from diffctl.rundir import claims_run_dir
from diffctl.sample_report import metric_rows, print_reference_and_notes, write_metrics
from diffctl.schema import SCHEMAS
from diffctl.signals import interruptible

RUN_OUTPUTS = ("samples.npz", "inpainted.npz")  # what `diffctl sample` / `diffctl inpaint` leave in their run directory
IMAGES = "images must be a folder of images, an .npz, a `diffctl sample`/`inpaint` run directory or <dataset>:<split>"
REF = "ref must be <dataset>:<split> (e.g. cifar10:train with ref_root=), a folder of images or an .npz (images or mu/sigma)"


def _kept(cfg: DictConfig) -> str:
    return ("metrics.json was not written, and reference features are cached (cache_dir) only once all are computed; "
            "run the command again")  # fmt: skip


def images_spec(value) -> str:
    """The images to read: a run directory stands for the samples.npz / inpainted.npz in it."""
    if value is None:
        raise ConfigError(f"{IMAGES}, got null")
    path = Path(str(value)).expanduser()
    if not path.is_dir():
        return str(value)
    found = [path / name for name in RUN_OUTPUTS if (path / name).is_file()]
    if len(found) > 1:
        raise ConfigError(f"images={value} holds both {' and '.join(RUN_OUTPUTS)}; name the one to score (images={found[0]})")
    if found:
        return str(found[0])
    if (path / ".hydra").is_dir():  # a run directory, not a folder of images (its PNG grid is no image set)
        raise ConfigError(f"images={value} is a run directory without {' or '.join(RUN_OUTPUTS)} "
                          f"(an unfinished run, or another command's); give a finished `diffctl sample` or `inpaint` run")  # fmt: skip
    return str(value)


def metrics_node(cfg: DictConfig) -> DictConfig:
    """The keys sample's `metrics:` node has (conf/metrics/default.yaml), which this command has at its top level."""
    keys = SCHEMAS["sample"]()["metrics"]
    return OmegaConf.create({k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k in keys})


def data_node(cfg: DictConfig) -> DictConfig:
    """What a <dataset>:<split> reference takes from the data config: no training dataset here, so its
    root is ref_root (diffctl.references.ref_source), its files fetched when `download`."""
    return OmegaConf.create({"name": None, "root": None, "download": bool(cfg.download)})


def _uint8(cfg: DictConfig, spec: str) -> torch.Tensor:
    """uint8 [N, C, H, W], as `diffctl sample` hands its samples to evaluate()."""
    images = read_images(spec, root=cfg.images_root, limit=cfg.limit, download=bool(cfg.download)).images
    return to_uint8(images).permute(0, 3, 1, 2).contiguous()


def _check_reference(cfg: DictConfig, images: torch.Tensor) -> None:
    """A reference that cannot be read is refused before any image is embedded."""
    from diffctl.image_folders import image_classes

    if cfg.ref is None:
        raise ConfigError(f"{REF}, got null")
    mcfg = metrics_node(cfg)
    n, c, h, _ = images.shape
    src = ref_source(mcfg, data_node(cfg), resolution=h, channels=c, num_samples=n)
    if isinstance(src, Path):  # statistics: read now (small), so a bad file stops the run here
        reference(mcfg, src, None, torch.device("cpu"))
    elif src["name"] == "imagefolder":
        image_classes(Path(src["root"]))  # an empty folder, or one without images, is named


def _try_detector(detector: Detector, images: torch.Tensor) -> None:
    """One image through the detector: one it cannot take (a TorchScript module made for another size,
    say) is a one-line error here rather than a traceback from inside the feature extraction."""
    try:
        feats, _ = detector(images[:1])
    except Exception as err:  # noqa: BLE001 -- whatever the network raises, on one line
        c, h, w = images.shape[1:]
        # TorchScript puts its own traceback first and the error last: the last line says what failed
        why = one_line(str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__, 200)
        raise ConfigError(f"the {detector.name} detector cannot take these {c}x{h}x{w} images ({why})") from None
    if feats.ndim != 2 or not bool(torch.isfinite(feats).all()):
        raise ConfigError(f"the {detector.name} detector gives {tuple(feats.shape)} features with non-finite values "
                          f"or not [batch, D] on these images")  # fmt: skip


@interruptible(_kept)  # SIGTERM/SIGINT: stops its worker processes too, one line
@claims_run_dir("metrics")  # refuses a used run directory, locks it while writing
def metrics_command(cfg: DictConfig) -> dict[str, Any]:
    from diffctl.schema import validate

    validate(cfg, "metrics_command")  # every key's type and range (diffctl/schema/keys.py), before any work
    from diffctl.console import route_library_logs

    route_library_logs()
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    spec = images_spec(cfg.images)
    if cfg.ref is None:  # before the images are read
        raise ConfigError(f"{REF}, got null")
    if not check_config(metrics_node(cfg)):
        raise ConfigError("names must list at least one of fid, kid, is, pr, got []")
    images = _uint8(cfg, spec)
    _check_reference(cfg, images)
    # the detector, tried on one image; loaded on the CPU when worker processes will load their own
    dev = device(None, cfg.trainer.accelerator) if cfg.trainer.devices == 1 else torch.device("cpu")
    detector = load_detector(metrics_node(cfg), dev)
    _try_detector(detector, images)
    plain_cfg = OmegaConf.to_container(cfg, resolve=True)
    local = {"detector": detector, "images": images} if cfg.trainer.devices == 1 else {}
    return launch(plain_cfg["trainer"], metrics_share, (plain_cfg, spec, str(out_dir)), lambda: _kept(cfg),
                  what="scoring", **local)  # fmt: skip


def metrics_share(fabric, cfg: dict, spec: str, out_dir: str, detector: Detector | None = None,
                  images: torch.Tensor | None = None) -> dict[str, Any] | None:  # fmt: skip
    """One process's share (diffctl.launch): a contiguous block of the images, in rank order as
    evaluate() needs; rank 0 writes metrics.json and returns the result."""
    cfg = OmegaConf.create(cfg)
    rank, world = (fabric.global_rank, fabric.world_size) if fabric is not None else (0, 1)
    dev = device(fabric, cfg.trainer.accelerator)
    images = _uint8(cfg, spec) if images is None else images
    n = len(images)
    start = time.perf_counter()
    scores = evaluate(images[rank * n // world : (rank + 1) * n // world], metrics_node(cfg), data_node(cfg), dev, detector)
    c, h, w = images.shape[1:]
    result = {"images": spec, "image_shape": f"{c}x{h}x{w}", "devices": world, **scores,
              "time_s": round(time.perf_counter() - start, 3)}  # fmt: skip
    if rank != 0:
        return None
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    write_metrics(Path(out_dir), result)
    print_table(result, Path(out_dir))
    return result


def print_table(result: dict[str, Any], out_dir: Path) -> None:
    from rich.console import Console

    from diffctl.console import print_paths, result_table

    rows = [(key, str(result[key])) for key in ("num_images", "image_shape", "detector", "devices", "time_s")]
    console = Console()
    console.print(result_table("diffctl metrics", rows + metric_rows(result)))
    print_reference_and_notes(result, console)
    print_paths({"images": result["images"], "metrics": out_dir / "metrics.json"}, console)
