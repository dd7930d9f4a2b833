"""The latent cache (diffctl/latents.py): what is stored, the exact latent scale, the training draws, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffctl.conditioning import CLASS_LABEL, IMAGE
from diffctl.errors import DataError
from diffctl.latents import (LATENT, LatentDataset, build_cache, cache_key, check_cache, draw_latents, expected_meta,
                             latent_moments, weights_hash)  # fmt: skip
from diffctl.rng import BatchRandom


class Images(torch.utils.data.Dataset):
    """n asymmetric 1x8x8 images in [-1, 1] with labels i % 3."""

    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 1, 8, 8, generator=g) * 2 - 1

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {IMAGE: self.x[i], CLASS_LABEL: i % 3}


def encode(x):  # a toy first stage: 2x2 means, std from the local contrast
    return F.avg_pool2d(x, 2), 0.05 + F.avg_pool2d(x.abs(), 2) * 0.2


META = expected_meta("abc", {"name": "toy", "split": "train"}, True, (1, 4, 4))


def test_cache_holds_each_image_and_its_mirror_in_order(tmp_path):
    data = Images(10)
    done = []
    d = build_cache(encode, data, tmp_path / "c", META, batch_size=4, flips=True, progress=done.append)  # 4 does not divide 10
    assert done == [4, 8, 10]
    z = np.load(d / "latents.npy")
    assert z.shape == (10, 2, 2, 4, 4)
    for i in (0, 5, 9):
        img = data.x[i]
        mirror = torch.from_numpy(np.ascontiguousarray(img.numpy()[..., ::-1]))  # the mirror image, made by numpy
        np.testing.assert_allclose(z[i, 0, :1], F.avg_pool2d(img[None], 2)[0].numpy(), rtol=0, atol=0)
        np.testing.assert_allclose(z[i, 1, :1], F.avg_pool2d(mirror[None], 2)[0].numpy(), rtol=0, atol=1e-7)
        np.testing.assert_allclose(z[i, 1, 1:], 0.05 + F.avg_pool2d(mirror.abs()[None], 2)[0].numpy() * 0.2, atol=1e-7)
    ds = LatentDataset(d)
    assert len(ds) == 10 and [int(ds[i]["class_label"]) for i in range(4)] == [0, 1, 2, 0]
    items = ds.__getitems__([7, 2])
    assert torch.equal(items[0][LATENT], torch.from_numpy(z[7])) and int(items[1]["class_label"]) == 2
    assert check_cache(d, META)["num_images"] == 10


def test_latent_scale_is_the_std_of_sampled_latents(tmp_path):
    d = build_cache(encode, Images(64), tmp_path / "c", META, batch_size=16, flips=True)
    mean, std = latent_moments(d, chunk=5)  # chunks that do not divide the set
    z = np.load(d / "latents.npy").astype(np.float64)
    mu, sd = z[:, :, :1], z[:, :, 1:]
    rng = np.random.default_rng(0)
    samples = mu[None] + sd[None] * rng.standard_normal((400, *mu.shape))  # Monte Carlo draws of z
    assert mean == pytest.approx(samples.mean(), abs=2e-3)
    assert std == pytest.approx(samples.std(), rel=3e-3)
    assert std > mu.std() * 1.01  # the posterior spread counts, not only the spread of the means


def test_draws_pick_the_mirror_and_sample_the_posterior(tmp_path):
    stored = torch.zeros(3, 2, 2, 1, 1)
    stored[:, 0, 0], stored[:, 1, 0] = 1.0, -1.0  # mean 1 unflipped, -1 mirrored
    stored[:, :, 1] = 0.0  # std 0: the draw is the mean itself
    flip = torch.tensor([False, True, False])
    z = draw_latents(stored, flip, BatchRandom(0, 0, 0, 0, 1, 3, "cpu"), scale=2.0, shift=0.5)
    assert z.flatten().tolist() == [1.0, -3.0, 1.0]  # (+-1 - 0.5) * 2
    big = torch.zeros(4000, 1, 2, 1, 1)
    big[:, 0, 0], big[:, 0, 1] = 3.0, 0.5
    z = draw_latents(big, None, BatchRandom(1, 0, 0, 0, 1, 4000, "cpu"), scale=1.0)
    assert float(z.mean()) == pytest.approx(3.0, abs=0.05) and float(z.std()) == pytest.approx(0.5, rel=0.05)
    again = draw_latents(big, None, BatchRandom(1, 0, 0, 0, 1, 4000, "cpu"), scale=1.0)
    assert torch.equal(z, again)  # keyed: a resumed step redraws the same latents


def test_a_cache_made_otherwise_is_refused_with_one_line(tmp_path):
    d = build_cache(encode, Images(4), tmp_path / "c", META, flips=True)
    for key, value, said in (("first_stage", "def", "first-stage weights"), ("flips", False, "flips"),
                             ("dataset", {"name": "other"}, "dataset"), ("latent_shape", [4, 2, 2], "latent shape")):
        with pytest.raises(DataError, match=f"made with other {said}") as err:
            check_cache(d, {**META, key: value})
        assert "\n" not in str(err.value)
    (d / "meta.json").unlink()
    with pytest.raises(DataError, match="not a complete latent cache"):
        check_cache(d, META)
    assert cache_key(META) != cache_key({**META, "first_stage": "def"}) and cache_key(META) == cache_key(dict(META))


def test_an_interrupted_encoding_leaves_nothing_that_looks_complete(tmp_path):
    calls = []

    def failing(x):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return encode(x)

    with pytest.raises(KeyboardInterrupt):
        build_cache(failing, Images(8), tmp_path / "c", META, batch_size=4)
    assert list(tmp_path.iterdir()) == []  # neither the cache nor its temporary directory


def test_weights_hash_tells_weights_apart():
    a, b = torch.nn.Conv2d(1, 2, 3), torch.nn.Conv2d(1, 2, 3)
    b.load_state_dict(a.state_dict())
    assert weights_hash(a) == weights_hash(b)
    with torch.no_grad():
        b.bias[1] += 1e-6
    assert weights_hash(a) != weights_hash(b)
