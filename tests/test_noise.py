"""Counter-based per-sample noise (diffctl/noise.py): the integers against the JDK's SplittableRandom and
the published SplitMix64 sequence, the normals' distribution, batch-split invariance, and the legacy
noise (version 1) that runs made before it resume with."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import interrupted_run, run_sample
from scipy import stats

from diffctl.noise import GeneratorNoise, SampleNoise, mix64, normals, sample_noise, words

GOLDEN = 0x9E3779B97F4A7C15
U64 = (1 << 64) - 1


def _unsigned(t: torch.Tensor) -> list[int]:
    return [v & U64 for v in t.reshape(-1).tolist()]


def test_mix64_on_a_weyl_sequence_is_the_published_splitmix64_sequence():
    """SplitMix64 seeded with 1234567: its first five outputs as published (Vigna's splitmix64.c;
    Rosetta Code "Pseudo-random numbers/Splitmix64")."""
    j = torch.arange(1, 6)
    out = mix64(1234567 + j * (GOLDEN - (1 << 64)))
    assert _unsigned(out) == [6457827717110365317, 3203168211198807973, 9817491932198370423, 4593380528125082431, 16408922859458223821]


# From OpenJDK 17's java.util.SplittableRandom (jshell): root = new SplittableRandom(key); sample i's
# generator s = (i+1)-th root.split(); draw d's generator r = (d+1)-th s.split(); words r.nextLong().
# For i < 64, d < 3, j < 3: the sum (mod 2^64, as a Java long) and the xor of Long.rotateLeft(w,
# i + 7d + 13j); and the words of sample 5, draw 2.
JDK = {
    0: (-1288592410219784890, 5494422543196136540, [165059237179824313, 316029675686766198, -4745849063845418796]),
    42: (-1680201599396425494, 4763313556913597620, [6935764884674688102, -4925853944685395051, -4058735658428942667]),
    -7046029254386353131: (-3951335690282493655, -7858257926372307578, [2298160573787054861, -2372099200999757096, 3197540597074703911]),
}


def _signed(v: int) -> int:
    v &= U64
    return v - (1 << 64) if v >= 1 << 63 else v


@pytest.mark.parametrize("key", list(JDK))
def test_words_are_the_jdk_splittable_random_outputs(key):
    total, rotxor, sample5 = JDK[key]
    got_sum, got_xor = 0, 0
    for d in range(3):
        w = words(key, torch.arange(64), d, 3)
        if d == 2:
            assert w[5].tolist() == sample5
        for i in range(64):
            for j in range(3):
                v, r = int(w[i, j]) & U64, (i + 7 * d + 13 * j) % 64
                got_sum += v
                got_xor ^= ((v << r) | (v >> (64 - r))) & U64
    assert (_signed(got_sum), _signed(got_xor)) == (total, rotxor)
    # far split numbers: sample 1000, draw 999 (1001 and 1000 sequential splits in Java)
    assert words(42, torch.tensor([1000]), 999, 2).tolist() == [[3902216124992639721, -2057735223744187130]]


def test_word_bits_are_balanced():
    w = words(3, torch.arange(200), 0, 100).reshape(-1)  # 20000 words
    bits = torch.stack([(w >> k) & 1 for k in range(64)]).double().mean(1)
    assert (bits - 0.5).abs().max() < 5 * 0.5 / math.sqrt(len(w))


def _z(n_samples=2000, dim=100, draw=0, seed=11) -> torch.Tensor:
    return normals(seed, torch.arange(n_samples), draw, (dim,)).double()


def test_normals_moments_and_ks():
    z = _z().reshape(-1).numpy()  # 200000 values
    n = len(z)
    assert abs(z.mean()) < 5 / math.sqrt(n)
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(stats.skew(z)) < 5 * math.sqrt(6 / n)
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24 / n)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert np.abs(z).max() < 6.0  # 24-bit uniforms: |z| <= sqrt(2 * 25 ln 2) = 5.89


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.reshape(-1) - a.mean(), b.reshape(-1) - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_no_correlation_between_neighbouring_samples_draws_and_elements():
    z, z1 = _z(draw=0), _z(draw=1)
    limit = 5 / math.sqrt(z[:-1].numel())
    pairs = {
        "samples i, i+1": (z[:-1], z[1:]),
        "draws d, d+1": (z, z1),
        "elements j, j+1 (a Box-Muller pair)": (z[:, 0::2], z[:, 1::2]),
        "elements j, j+1 (across words)": (z[:, 1:-1:2], z[:, 2::2]),
    }
    for what, (a, b) in pairs.items():
        assert abs(_corr(a, b)) < limit, what
        assert abs(_corr(a * a, b * b)) < limit, f"{what}, squares"
    # the same element of another seed
    assert abs(_corr(z, _z(seed=12))) < limit


@pytest.mark.parametrize("dim", [1, 3, 8, 37, 256])
def test_normals_are_bitwise_the_same_for_any_batch_split(dim):
    whole = normals(5, torch.arange(1000), 2, (dim,))
    for chunk in (7, 64, 333, 999):
        parts = torch.cat([normals(5, torch.arange(a, min(a + chunk, 1000)), 2, (dim,)) for a in range(0, 1000, chunk)])
        assert torch.equal(whole, parts), chunk
    assert torch.equal(whole[:40], torch.cat([normals(5, torch.tensor([i]), 2, (dim,)) for i in range(40)]))  # one by one
    for offset in (1, 17, 500):
        assert torch.equal(whole[offset:], normals(5, torch.arange(offset, 1000), 2, (dim,)))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(whole, normals(5, torch.arange(1000), 2, (dim,)))
    finally:
        torch.set_num_threads(threads)


def test_sample_noise_numbers_draws_in_call_order_and_keeps_dtypes_equal():
    noise = SampleNoise(9, range(10, 14))
    x = torch.zeros(4, 2, 3)
    first, second = noise.randn_like(x), noise.randn_like(x.double())
    assert first.shape == (4, 2, 3) and second.dtype == torch.float64
    assert torch.equal(first, normals(9, torch.arange(10, 14), 0, (2, 3)))
    assert torch.equal(second, normals(9, torch.arange(10, 14), 1, (2, 3)).double())  # float64: the same numbers
    half = SampleNoise(9, range(10, 14)).randn((2, 3), torch.bfloat16)
    assert torch.equal(half, first.to(torch.bfloat16))
    with pytest.raises(ValueError, match="4 samples"):
        noise.randn_like(torch.zeros(3, 2))
    # draws computed ahead (small batches) or one at a time (large ones), shapes changing between calls
    for n in (4, 20000):
        noise, idx = SampleNoise(9, range(n)), torch.arange(n)
        for d, shape in enumerate([(2,), (2,), (3, 1), (2,), (2,)]):
            assert torch.equal(noise.randn(shape), normals(9, idx, d, shape)), (n, d)


def test_generate_is_the_same_for_any_batching():
    from diffctl.networks.gmm import GaussianMixture, MixtureModel
    from diffctl.samplers import generate
    from diffctl.sde import VPSDE

    den = MixtureModel(GaussianMixture(torch.tensor([[-1.0, 0.5], [1.0, -0.5]]), scales=0.3), VPSDE())
    whole = generate(den, 9, (2,), "ddpm", 5, seed=2)
    parts = torch.cat([generate(den, n, (2,), "ddpm", 5, seed=2, first_index=f) for f, n in ((0, 4), (4, 1), (5, 4))])
    assert torch.equal(whole, parts)
    legacy = generate(den, 9, (2,), "ddpm", 5, seed=2, noise_version=1)
    assert not torch.allclose(whole, legacy)  # versions differ
    with pytest.raises(ValueError, match="noise version"):
        sample_noise(0, range(2), version=3)


# `diffctl sample model=gmm sampler=ddpm steps=3 num_samples=6 seed=0` made by diffctl before
# counter-based noise (commit 1e9591d; its samples.npz), i.e. noise version 1.
OLD_SAMPLES = [[-0.5996912121772766, -0.440255731344223], [-1.4476336240768433, 0.64372318983078],
               [-1.6039093732833862, -0.17978720366954803], [1.1726468801498413, -0.2695811986923218],
               [-1.0464295148849487, -1.4273895025253296], [-0.8000838756561279, 0.4627271294593811]]  # fmt: skip
OLD_RUN = ["model=gmm", "sampler=ddpm", "steps=3", "num_samples=6", "seed=0", "metrics.names=[]"]


def test_generator_noise_gives_the_samples_of_diffctl_before_counter_noise(tmp_path):
    result = run_sample(tmp_path / "run", [*OLD_RUN, "noise=1"])
    assert result["noise"] == 1
    with np.load(tmp_path / "run" / "samples.npz") as z:
        np.testing.assert_array_equal(z["samples"], np.float32(OLD_SAMPLES))


def test_a_run_from_before_counter_noise_resumes_with_its_own_noise(tmp_path, monkeypatch):
    """An interrupted run whose config and manifest record no noise version (as diffctl wrote them
    before) resumes with noise version 1: its samples are the old diffctl's."""
    from omegaconf import OmegaConf

    run = tmp_path / "old"
    interrupted_run(run, [*OLD_RUN, "batch_size=2", "noise=1"], 1, monkeypatch)
    config = run / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(config)
    del cfg["noise"]  # what the old diffctl stored: no noise key in the config or the manifest
    OmegaConf.save(cfg, config)
    manifest = run / "partial" / "manifest.json"
    recorded = json.loads(manifest.read_text())
    assert recorded.pop("noise") == 1
    manifest.write_text(json.dumps(recorded))
    assert len(list((run / "partial").glob("shard-*.npz"))) == 1

    result = run_sample(tmp_path / "log", [f"resume={run}"])
    assert result["resumed_samples"] == 2 and result["noise"] == 1
    with np.load(run / "samples.npz") as z:
        np.testing.assert_array_equal(z["samples"], np.float32(OLD_SAMPLES))


def test_a_new_run_records_the_counter_noise_in_its_manifest(tmp_path, monkeypatch):
    import diffctl.generation as generation  # where sample() calls the sampler

    written = {}
    real = generation.generate

    def spy(*a, **k):
        written.update(json.loads((tmp_path / "run" / "partial" / "manifest.json").read_text()))
        return real(*a, **k)

    monkeypatch.setattr(generation, "generate", spy)
    result = run_sample(tmp_path / "run", OLD_RUN)
    assert written["noise"] == 2 and result["noise"] == 2
    with np.load(tmp_path / "run" / "samples.npz") as z:
        assert not np.allclose(z["samples"], np.float32(OLD_SAMPLES))


def test_generator_noise_rows_are_per_sample_torch_generators():
    from diffctl.rng import mix_seed

    noise = GeneratorNoise(4, [3, 8])
    got = noise.randn((5,))
    want = torch.stack([torch.randn(5, generator=torch.Generator().manual_seed(mix_seed(4, i))) for i in (3, 8)])
    assert torch.equal(got, want)
