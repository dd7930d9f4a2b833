"""Data loading on small files written in the datasets' real on-disk formats."""

import gzip
import inspect
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from diffctl.data import DataError, DiffusionDataModule, build_dataset, dataset_num_classes

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"
HINTS = ("ve_sigma_max",)  # data-config keys read by other groups; the trainer strips them before instantiating



def _xy(item: dict):
    """(image, label) of a dataset item (a dict with diffctl.conditioning's batch keys)."""
    return item["image"], item["class_label"]

def load_conf(name):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    return OmegaConf.masked_copy(cfg, [k for k in cfg if k not in HINTS])
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def lo_hi(x):
    return float(x.min()), float(x.max())


# ---------------------------------------------------------------- format writers


def write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> None:
    """IDX: two zero bytes, type 0x08 (ubyte), ndim, big-endian uint32 dims, then raw bytes."""
    payload = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        with gzip.open(f"{path}.gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def make_idx_set(folder: Path, n_train=12, n_test=5, gz=False):
    """Four MNIST-style files; image i has pixel (0,0)=255, (0,1)=0, rest i; label i % 10."""
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, 28, 28)).copy()
        images[:, 0, 0], images[:, 0, 1] = 255, 0
        labels = np.arange(n, dtype=np.uint8) % 10
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz)
        out[prefix] = (images, labels)
    return out


def make_cifar(root: Path, per_batch=4, n_test=3):
    """cifar-10-batches-py as the CIFAR site documents it: pickled dicts, 'data' is N x 3072 uint8
    (1024 red, then green, then blue values, row-major), 'labels' a list of ints; written with protocol 2
    like the original Python 2 files."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for i, fname in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        n = n_test if fname == "test_batch" else per_batch
        hwc = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        hwc[:, 0, 0] = (255, 0, 0)  # pure red top-left pixel
        entry = {
            "batch_label": f"batch {i}",
            "labels": [(i + j) % 10 for j in range(n)],
            "data": hwc.transpose(0, 3, 1, 2).reshape(n, 3072),
            "filenames": [f"img_{i}_{j}.png" for j in range(n)],
        }
        (d / fname).write_bytes(pickle.dumps(entry, protocol=2))
        batches[fname] = (hwc, entry["labels"])
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
            "num_cases_per_batch": per_batch, "num_vis": 3072}
    (d / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return batches


def png(path: Path, img: Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def half_white(size=8, mode="RGB"):
    """Left half white, right half black: tells flips apart."""
    arr = np.zeros((size, size, 3), np.uint8)
    arr[:, : size // 2] = 255
    return Image.fromarray(arr).convert(mode)


@pytest.fixture
def class_folder(tmp_path):
    root = tmp_path / "imgs"
    for c, n in (("cat", 3), ("dog", 2), ("emu", 1)):
        for i in range(n):
            png(root / c / f"{i}.png", half_white())
    png(root / ".ipynb_checkpoints" / "x.png", half_white())  # hidden: must not become a class
    return root


# ---------------------------------------------------------------- digits


def test_digits_values_split_and_dataloader():
    from sklearn.datasets import load_digits

    raw = load_digits().images
    train, test = build_dataset("digits", split="train"), build_dataset("digits", split="test")
    assert (len(train), len(test)) == (1500, 297)
    x, y = _xy(train[0])
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and isinstance(y, int)
    assert torch.equal(((x[0] + 1) * 127.5).round(), torch.from_numpy(np.rint(raw[0] * 255 / 16)).float())
    assert x[0, 0, 0] == -1.0  # sklearn value 0
    i, r, c = np.argwhere(raw[:1500] == 16)[0]
    assert train[i]["image"][0, r, c] == 1.0  # sklearn value 16 (max)
    assert torch.equal(test[0]["image"], build_dataset("digits", split="train", limit=None).transform(
        Image.fromarray(np.rint(raw[1500] * 255 / 16).astype(np.uint8))))  # test = last 297, same pixels via PIL path

    dm = DiffusionDataModule(name="digits", resolution=8, channels=1, batch_size=32, num_workers=0)
    dm.setup("fit")
    assert (dm.num_classes, dm.channels, dm.resolution, dm.num_train) == (10, 1, 8, 1500)
    xb, yb = _xy(next(iter(dm.train_dataloader())))
    assert xb.shape == (32, 1, 8, 8) and xb.dtype == torch.float32 and yb.dtype == torch.long
    assert -1.0 <= xb.min() and xb.max() <= 1.0
    assert len(dm.train_dataloader()) == 1500 // 32  # drop_last
    assert len(dm.dataset("test")) == 297


def test_digits_resize_channels_limit():
    ds = build_dataset("digits", resolution=16, channels=3, limit=10)
    x = ds[0]["image"]
    assert len(ds) == 10 and x.shape == (3, 16, 16)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # gray replicated into RGB
    assert -1.0 <= x.min() and x.max() <= 1.0


# ---------------------------------------------------------------- MNIST / Fashion-MNIST


def test_mnist_torchvision_layout(tmp_path):
    from torchvision.datasets import MNIST

    written = make_idx_set(tmp_path / "MNIST" / "raw")
    reference = MNIST(str(tmp_path), train=True)  # torchvision itself accepts these files
    assert torch.equal(reference.data, torch.from_numpy(written["train"][0]))

    dm = DiffusionDataModule(name="mnist", root=str(tmp_path), resolution=28, channels=1, batch_size=4, num_workers=0)
    dm.setup()
    assert dm.num_train == 12 and dm.num_classes == 10
    x, y = _xy(dm.dataset("train")[3])
    assert x.shape == (1, 28, 28) and y == 3
    assert x[0, 0, 0] == 1.0 and x[0, 0, 1] == -1.0 and x[0, 5, 5] == pytest.approx(3 / 127.5 - 1)
    test = dm.dataset("test")
    assert len(test) == 5 and [test[i]["class_label"] for i in range(5)] == [0, 1, 2, 3, 4]
    xb, yb = _xy(next(iter(dm.train_dataloader())))
    assert xb.shape == (4, 1, 28, 28) and yb.dtype == torch.long


def test_fashion_flat_gz_layout_resize_and_rgb(tmp_path):
    make_idx_set(tmp_path, n_train=30, gz=True)  # Debian ships the gzipped files directly in one folder
    ds = build_dataset("fashion_mnist", tmp_path, "train", resolution=32, channels=3, limit=7)
    assert len(ds) == 7
    x, y = _xy(ds[5])
    assert x.shape == (3, 32, 32) and y == 5 and -1.0 <= x.min() and x.max() == 1.0
    assert x[:, 16, 16].tolist() == [pytest.approx(5 / 127.5 - 1)] * 3  # uniform interior survives resizing
    assert dataset_num_classes("fashion_mnist", tmp_path) == 10


def test_idx_errors(tmp_path):
    with pytest.raises(DataError, match=r"mnist files not found under '.*nowhere'.*data\.download=true.*data\.root="):
        DiffusionDataModule(name="mnist", root=str(tmp_path / "nowhere"))
    make_idx_set(tmp_path / "half")
    for f in (tmp_path / "half").glob("t10k-*"):
        f.unlink()  # test split missing is caught at construction too
    with pytest.raises(DataError, match="not found"):
        DiffusionDataModule(name="fashion_mnist", root=str(tmp_path / "half"))
    bad = tmp_path / "bad"
    make_idx_set(bad)
    (bad / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 12, 28, 28) + b"\x01" * 10)
    with pytest.raises(DataError, match="truncated"):
        build_dataset("mnist", bad)


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_debian_fashion_mnist():
    dm = instantiate(load_conf("fashion_mnist"), limit=256, num_workers=0)
    assert str(dm.root) == str(DEBIAN_FASHION)
    dm.setup()
    assert dm.num_train == 256 and len(dm.dataset("test")) == 10000
    xb, yb = _xy(next(iter(dm.train_dataloader())))
    assert xb.shape == (128, 1, 28, 28) and lo_hi(xb) == (-1.0, 1.0) and 0 <= int(yb.min()) <= int(yb.max()) <= 9


# ---------------------------------------------------------------- CIFAR-10


def test_cifar10_pickle_batches(tmp_path):
    batches = make_cifar(tmp_path)
    train = build_dataset("cifar10", tmp_path, "train")
    assert len(train) == 20
    x, y = _xy(train[5])  # second image of data_batch_2
    hwc, labels = batches["data_batch_2"]
    assert x.shape == (3, 32, 32) and y == labels[1]
    assert torch.equal(x, torch.from_numpy(hwc[1]).permute(2, 0, 1).float() / 127.5 - 1)  # exact round trip
    assert x[:, 0, 0].tolist() == [1.0, -1.0, -1.0]

    gray = build_dataset("cifar10", tmp_path / "cifar-10-batches-py", "test", channels=1)  # the folder itself works
    red_l = Image.new("RGB", (1, 1), (255, 0, 0)).convert("L").getpixel((0, 0))
    assert len(gray) == 3 and gray[0]["image"].shape == (1, 32, 32)
    assert gray[0]["image"][0, 0, 0] == pytest.approx(red_l / 127.5 - 1)

    dm = DiffusionDataModule(name="cifar10", root=str(tmp_path), resolution=32, channels=3, random_flip=True,
                             batch_size=8, num_workers=0)
    dm.setup()
    xb = next(iter(dm.train_dataloader()))["image"]
    assert xb.shape == (8, 3, 32, 32)
    assert dm.dataset("test").transform.random_flip is False  # reference statistics are never augmented


def test_cifar10_errors(tmp_path):
    with pytest.raises(DataError, match=r"cifar10 files not found under .*data_batch_1\.\.5.*data\.download=true"):
        DiffusionDataModule(name="cifar10", root=str(tmp_path))
    make_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("this must not run",))

    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps({"data": Evil()}))
    with pytest.raises(DataError, match="data_batch_3' is not a CIFAR-10 python batch.*refusing"):
        build_dataset("cifar10", tmp_path)


# ---------------------------------------------------------------- image folders


def test_imagefolder_classes(class_folder):
    dm = DiffusionDataModule(name="imagefolder", root=str(class_folder), resolution=8, channels=3, batch_size=2,
                             num_workers=2)
    assert dm.num_classes == 3  # cat, dog, emu; hidden folder ignored
    dm.setup()
    ds = dm.dataset("train")
    assert len(ds) == 6 and sorted(ds[i]["class_label"] for i in range(6)) == [0, 0, 0, 1, 1, 2]
    x = ds[0]["image"]
    assert x.shape == (3, 8, 8) and (x[:, :, :4] == 1.0).all() and (x[:, :, 4:] == -1.0).all()  # no flip asked
    xb, yb = _xy(next(iter(dm.train_dataloader())))  # worker processes
    assert xb.shape == (2, 3, 8, 8) and yb.dtype == torch.long
    limited = build_dataset("imagefolder", class_folder, resolution=8, limit=4)
    assert len(limited) == 4 and [limited[i]["class_label"] for i in range(4)] == [0, 0, 0, 1]


def test_imagefolder_flat_crop_and_gray(tmp_path):
    wide = np.zeros((8, 24, 3), np.uint8)
    wide[:, 8:16] = (0, 255, 0)  # only the middle third is green: center crop keeps exactly it
    png(tmp_path / "a.png", Image.fromarray(wide))
    png(tmp_path / "b.jpg", Image.new("RGB", (40, 40), (255, 255, 255)))
    (tmp_path / "notes.txt").write_text("not an image")
    assert dataset_num_classes("imagefolder", tmp_path) == 0
    ds = build_dataset("imagefolder", tmp_path, resolution=8, channels=3)
    assert len(ds) == 2 and [ds[i]["class_label"] for i in range(2)] == [0, 0]
    x = ds[0]["image"]
    assert (x[1] == 1.0).all() and (x[0] == -1.0).all() and (x[2] == -1.0).all()
    g = build_dataset("imagefolder", tmp_path, resolution=4, channels=1)[1]["image"]  # 40x40 JPEG downscaled
    assert g.shape == (1, 4, 4) and torch.allclose(g, torch.ones_like(g), atol=2 / 127.5)


def test_random_flip_only_when_asked(class_folder):
    torch.manual_seed(0)
    flipped = build_dataset("imagefolder", class_folder, resolution=8, random_flip=True)
    lefts = {float(flipped[0]["image"][0, 0, 0]) for _ in range(40)}
    assert lefts == {1.0, -1.0}  # both orientations occur
    plain = build_dataset("imagefolder", class_folder, resolution=8, random_flip=False)
    assert {float(plain[0]["image"][0, 0, 0]) for _ in range(20)} == {1.0}
    still, moving = build_dataset("digits", random_flip=False), build_dataset("digits", random_flip=True)
    seen = {moving[0]["image"].flip(-1).equal(still[0]["image"]) for _ in range(40)}  # in-memory path flips too
    assert seen == {True, False}


@pytest.mark.parametrize("channels", [1, 3])
def test_in_memory_images_resized_up_front_match_per_item_pil(monkeypatch, channels):
    """Presizing and whole-batch fetches are a speed-up only: the same pixels, batches and labels as
    the per-item PIL path (taken when the resized set would not fit under the memory limit)."""
    from torch.utils.data import DataLoader

    from diffctl.data import ArrayImageDataset

    rgb = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (40, 11, 7, 3), dtype=np.uint8))
    for images in (rgb, rgb[..., 0]):  # RGB and grayscale sources, resized (and converted) to 5x5
        fast = build_dataset("digits", resolution=5, channels=channels)
        fast = ArrayImageDataset(images, torch.arange(40), fast.transform)
        monkeypatch.setattr(ArrayImageDataset, "PRESIZE_LIMIT_BYTES", 0)
        slow = ArrayImageDataset(images, torch.arange(40), fast.transform)
        monkeypatch.undo()
        assert fast._chw is not None and slow._chw is None
        for i in (0, 17, 39):
            assert fast[i]["image"].shape == (channels, 5, 5) and torch.equal(fast[i]["image"], slow[i]["image"]) and fast[i]["class_label"] == i
        batches = [list(DataLoader(ds, batch_size=8, shuffle=False)) for ds in (fast, slow)]
        for (xf, yf), (xs, ys) in ((_xy(f), _xy(s)) for f, s in zip(*batches)):
            assert torch.equal(xf, xs) and torch.equal(yf, ys) and yf.dtype == torch.long


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        DiffusionDataModule(name="imagefolder", root=str(tmp_path / "missing"), resolution=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="'.*empty' is empty"):
        DiffusionDataModule(name="imagefolder", root=str(tmp_path / "empty"), resolution=8)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "readme.md").write_text("hi")
    with pytest.raises(DataError, match="contains no image files"):
        DiffusionDataModule(name="imagefolder", root=str(tmp_path / "text"), resolution=8)
    png(tmp_path / "cls" / "a" / "0.png", half_white())
    (tmp_path / "cls" / "b").mkdir()
    with pytest.raises(DataError, match="class folders .* contain no image files: b"):
        DiffusionDataModule(name="imagefolder", root=str(tmp_path / "cls"), resolution=8)
    with pytest.raises(DataError, match="data.root is required for imagefolder"):
        DiffusionDataModule(name="imagefolder", resolution=8)


# ---------------------------------------------------------------- config errors and YAML files


def test_config_errors():
    with pytest.raises(DataError, match="unknown dataset data.name='svhn'.*digits, mnist"):
        DiffusionDataModule(name="svhn")
    with pytest.raises(DataError, match="data.channels must be 1 .* or 3 .*got 2"):
        DiffusionDataModule(name="digits", channels=2)
    with pytest.raises(DataError, match="data.limit"):
        build_dataset("digits", limit=0)
    with pytest.raises(DataError, match="data.batch_size"):
        DiffusionDataModule(batch_size=0)
    dm = DiffusionDataModule(name="digits", batch_size=64, limit=10, num_workers=0)
    with pytest.raises(DataError, match="10 images, fewer than data.batch_size=64"):
        dm.setup()


@pytest.mark.parametrize("name", ["digits", "mnist", "fashion_mnist", "cifar10", "imagefolder"])
def test_yaml_configs(name, tmp_path):
    text = (CONF / f"{name}.yaml").read_text()
    cfg = load_conf(name)
    # `seed` is passed by `diffctl train` from the top-level seed, not set per dataset.
    params = set(inspect.signature(DiffusionDataModule.__init__).parameters) - {"self", "seed"}
    assert set(cfg) == params | {"_target_"} and cfg.name == name
    for line in text.splitlines():  # every key documented on its own line
        if line and not line[0].isspace() and not line.startswith("#") and not line.startswith("_target_"):
            assert "#" in line, line
    if name == "digits":
        dm = instantiate(cfg)
        assert (dm.resolution, dm.channels, dm.random_flip) == (8, 1, False)
        return
    root = tmp_path / "files"
    if name in ("mnist", "fashion_mnist"):
        make_idx_set(root)
    elif name == "cifar10":
        make_cifar(root)
    else:
        png(root / "x.png", half_white(80))
    dm = instantiate(cfg, root=str(root), num_workers=0, batch_size=1)
    dm.setup()
    x, y = _xy(dm.dataset("train")[0])
    assert x.shape == (cfg.channels, cfg.resolution, cfg.resolution) and lo_hi(x) >= (-1.0, -1.0)
    assert dm.random_flip == (name in ("cifar10", "imagefolder"))
