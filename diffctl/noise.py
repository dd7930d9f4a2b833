"""Counter-based per-sample noise: the normal for (seed, sample index, draw number, element) computed by
a stateless, vectorized integer function on the tensor's own device, so sample i's noise is the same
whatever the batch it is drawn in, at the price of a few elementwise kernels.

The integers are those of Java's `SplittableRandom` (Steele, Lea & Flood 2014, "Fast splittable
pseudorandom number generators"; SplitMix64): a root generator seeded with `key`; sample i's
generator is the root's split number i, draw d of sample i is that generator's split number d, and
element word j is the (j+1)-th `nextLong()` of the draw's generator. A split is random-access
(split k of a generator with seed s and odd increment g has seed mix64(s + (2k+1) g) and increment
mix_gamma(s + (2k+2) g)), so rows are computed for any index directly. Why this construction:
- quality: SplitMix64 passes BigCrush, and every split stream has its own odd increment (as in
  SplittableRandom), so two rows are two Weyl sequences with different strides: they never share a
  shifted run of values, whatever their seeds;
- speed: one 64-bit word (two normals) costs 11 int64 operations (2 multiplies) per element, against
  Philox-4x32-10's 20 multiplies per 4 words, which int64 emulation on CPUs without a 64-bit vector
  multiply made 4-14x one torch.randn eager and 5x compiled (measured on 2 cores); so it runs eager,
  with no compile stall, on every device. tests/test_noise.py checks the integers against the JDK's
  own SplittableRandom and the published SplitMix64 sequence.

Normals: Box-Muller on each word, in float32: u = (top 24 bits + 0.5) / 2^24, angle = 2 pi (low 24
bits) / 2^24; z = (r cos, r sin), r = sqrt(-2 log u). |z| <= 5.9 (as for torch.randn's float32
uniforms). The values are float32 numbers for every dtype (float64 gets them exactly, half types
rounded), so a sampler in float64 sees the same noise as one in float32.

Guarantee: the integers are exact on every device. The normals are bitwise the same on one machine's
CPU for any batch split, offset or batch size (tests/test_noise.py, many split points); on another
device type the transcendental functions (log, cos, sin) may differ in the last bit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NOISE_VERSION = 2  # recorded in a sample run's manifest; 1 = one CPU torch.Generator per sample (legacy)
NOISE_VERSIONS = (1, 2)


def mix_seed(*parts: int) -> int:
    """Mix integers into one 63-bit generator seed."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def sample_generators(seed: int, indices) -> list[torch.Generator]:
    """One CPU generator per sample index, seeded by (seed, index): likelihood.py's probes and
    dequantization (one draw per sample), and noise version 1; the samplers' noise is counter-based (below)."""
    return [torch.Generator().manual_seed(mix_seed(seed, int(i))) for i in indices]


def _signed(c: int) -> int:
    """A 64-bit constant as the int64 torch stores (written signed: inductor rejects ints >= 2^63)."""
    c &= 0xFFFFFFFFFFFFFFFF
    return c - (1 << 64) if c >= 1 << 63 else c


GOLDEN_GAMMA = _signed(0x9E3779B97F4A7C15)
_M1, _M2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)  # mix64 (Stafford's variant 13)
_G1, _G2 = _signed(0xFF51AFD7ED558CCD), _signed(0xC4CEB9FE1A85EC53)  # mix_gamma (MurmurHash3's fmix64)
_ALT = _signed(0xAAAAAAAAAAAAAAAA)


def _shr(z: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 bit patterns (torch's shift is arithmetic). bitwise_right_shift:
    the `>>` operator with a Python int measured 2-20x slower (a slow scalar path)."""
    return torch.bitwise_right_shift(z, k).bitwise_and_((1 << (64 - k)) - 1)


def mix64(z: Tensor) -> Tensor:
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    return z ^ _shr(z, 31)


def _popcount(z: Tensor) -> Tensor:
    z = z - (_shr(z, 1) & 0x5555555555555555)
    z = (z & 0x3333333333333333) + (_shr(z, 2) & 0x3333333333333333)
    z = (z + _shr(z, 4)) & 0x0F0F0F0F0F0F0F0F
    return _shr(z * 0x0101010101010101, 56)


def mix_gamma(z: Tensor) -> Tensor:
    """An odd increment with enough bit transitions (SplittableRandom.mixGamma)."""
    z = (z ^ _shr(z, 33)) * _G1
    z = (z ^ _shr(z, 33)) * _G2
    z = (z ^ _shr(z, 33)) | 1
    return torch.where(_popcount(z ^ _shr(z, 1)) < 24, z ^ _ALT, z)


def split(seed: Tensor, gamma: Tensor, k: Tensor | int) -> tuple[Tensor, Tensor]:
    """(seed, increment) of split number k of the generators (seed, gamma)."""
    s = seed + (2 * k + 1) * gamma
    return mix64(s), mix_gamma(s + gamma)


def sample_streams(key: int, indices: Tensor) -> tuple[Tensor, Tensor]:
    """(seed, increment) of each sample's generator: split number `index` of the root `key`."""
    return split(torch.full_like(indices, _signed(key)), torch.full_like(indices, GOLDEN_GAMMA), indices)


def row_streams(key: int, indices: Tensor, draw: int, streams=None) -> tuple[Tensor, Tensor]:
    """(seed, increment) of draw `draw` of each sample in `indices` (int64) under root seed `key`
    (`streams`: their sample_streams, when already known)."""
    seed, gamma = streams if streams is not None else sample_streams(key, indices)
    return split(seed, gamma, draw)


def _mix64_(z: Tensor) -> Tensor:
    """mix64 in place (one temporary): the same values, without a fresh tensor per operation."""
    t = torch.empty_like(z)
    for k, m in ((30, _M1), (27, _M2), (31, None)):
        torch.bitwise_right_shift(z, k, out=t)
        t &= (1 << (64 - k)) - 1
        z ^= t
        if m is not None:
            z *= m
    return z


def words(key: int, indices: Tensor, draw: int, n: int, streams=None) -> Tensor:
    """(len(indices), n) int64: the first n nextLong() outputs of each row's draw-`draw` generator."""
    seed, gamma = row_streams(key, indices, draw, streams)
    z = torch.arange(1, n + 1, dtype=torch.int64, device=indices.device) * gamma[:, None]
    z += seed[:, None]
    return _mix64_(z)


_U = 2.0**-24


def normals_from_words(w: Tensor, n: int) -> Tensor:
    """(B, W) int64 words -> (B, n) float32 standard normals, two per word (n <= 2W). Every
    transcendental op runs on a contiguous tensor (ATen's vectorized path for all of its elements;
    a strided output would take the scalar libm path, 1 ulp off), the interleaving is a copy."""
    u = _shr(w, 40).to(torch.float32)  # top 24 bits
    u += 0.5
    u *= _U  # (0, 1)
    angle = (w & 0xFFFFFF).to(torch.float32)  # low 24 bits
    angle *= 2 * math.pi * _U  # [0, 2 pi)
    r = torch.log(u)
    r *= -2.0
    r.sqrt_()
    out = torch.empty(*w.shape, 2, dtype=torch.float32, device=w.device)
    out[..., 0] = torch.cos(angle).mul_(r)
    out[..., 1] = torch.sin(angle).mul_(r)
    return out.reshape(w.shape[0], -1)[:, :n]


CHUNK = 1 << 15  # words per block on CPU: bounds the int64 temporaries (256 KiB each) so every elementwise pass stays in cache


def rows_normals(seed: Tensor, gamma: Tensor, n: int) -> Tensor:
    """(R, n) float32 normals of R generators (seed, increment): two per nextLong() output. On CPU
    in blocks of rows (the values are elementwise, so blocks do not change them)."""
    w = (n + 1) // 2
    rows = len(seed) if seed.device.type != "cpu" else max(1, CHUNK // max(w, 1))
    j = torch.arange(1, w + 1, dtype=torch.int64, device=seed.device)
    blocks = []
    for a in range(0, len(seed), rows):
        z = j * gamma[a : a + rows, None]
        z += seed[a : a + rows, None]
        blocks.append(normals_from_words(_mix64_(z), n))
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


def normals(key: int, indices: Tensor, draw: int, shape, streams=None) -> Tensor:
    """Standard normals of per-row `shape` (float32) for each sample index, on indices' device."""
    seed, gamma = row_streams(key, indices, draw, streams)
    return rows_normals(seed, gamma, math.prod(shape)).reshape(len(indices), *shape)


def draws_normals(streams: tuple[Tensor, Tensor], first: int, count: int, shape) -> Tensor:
    """(count, B, *shape): draws first .. first+count-1 of B samples (their sample_streams) at once;
    draw k is exactly `normals(..., first + k, ...)`."""
    seed, gamma = streams
    draws = torch.arange(first, first + count, dtype=torch.int64, device=seed.device)
    s, g = split(seed[None, :], gamma[None, :], draws[:, None])  # (count, B)
    return rows_normals(s.reshape(-1), g.reshape(-1), math.prod(shape)).reshape(count, len(seed), *shape)


PREFETCH = 64  # draws computed together for small batches (up to CHUNK values): ~80 small ops per call, not per draw


class SampleNoise:
    """The noise of samples `indices` under `seed`: draw k of sample i depends only on (seed, i, k).

    Every call of randn/randn_like is the next draw (0, 1, 2, ...); samplers call it in the same
    order for every batch, so sample i's noise is the same for any batch it is drawn in."""

    version = 2

    def __init__(self, seed: int, indices, device=None):
        self.seed = int(seed)
        self.indices = torch.as_tensor(list(indices) if not isinstance(indices, Tensor) else indices, dtype=torch.int64)
        self.indices = self.indices.reshape(-1).to(device)
        self.streams = sample_streams(self.seed, self.indices)  # the draws' generators split from these
        self.draws = 0
        self._block = None  # (shape and device, its first draw, the draws computed ahead)

    def __len__(self) -> int:
        return len(self.indices)

    def randn(self, shape, dtype=torch.float32, device=None) -> Tensor:
        device = self.indices.device if device is None else torch.device(device)
        shape = tuple(shape)
        key, d = (shape, device), self.draws
        if self._block is None or self._block[0] != key or not 0 <= d - self._block[1] < len(self._block[2]):
            count = max(1, min(PREFETCH, CHUNK // max(1, len(self) * math.prod(shape))))
            streams = tuple(s.to(device) for s in self.streams)
            self._block = (key, d, draws_normals(streams, d, count, shape))
        block, k = self._block[2], d - self._block[1]
        self.draws += 1
        return block[k].to(dtype, copy=len(block) > 1)  # a copy: the caller owns it, the block stays intact

    def randn_like(self, x: Tensor) -> Tensor:
        if x.shape[0] != len(self):
            raise ValueError(f"noise for {len(self)} samples, asked for a batch of {x.shape[0]}")
        return self.randn(x.shape[1:], x.dtype, x.device)


class GeneratorNoise:
    """Noise version 1 (runs made before counter-based noise): one CPU torch.Generator per sample,
    seeded by (seed, index), each draw a torch.randn per sample, stacked and copied to the device."""

    version = 1

    def __init__(self, seed: int, indices, device=None):

        self.generators = sample_generators(seed, indices)
        self.device = device

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape, dtype=torch.float32, device=None) -> Tensor:
        rows = [torch.randn(tuple(shape), generator=g, dtype=dtype) for g in self.generators]
        return torch.stack(rows).to(self.device if device is None else device)

    def randn_like(self, x: Tensor) -> Tensor:
        return self.randn(x.shape[1:], x.dtype, x.device)


def sample_noise(seed: int, indices, device=None, version: int = NOISE_VERSION):
    """The noise source of `version` (NOISE_VERSIONS) for samples `indices`."""
    if version == 2:
        return SampleNoise(seed, indices, device)
    if version == 1:
        return GeneratorNoise(seed, indices, device)
    raise ValueError(f"unknown noise version {version!r}; known: {', '.join(map(str, NOISE_VERSIONS))}")
