"""The noise contract (docs/design.md 2.1): Philox known answers, backend agreement, layout, statistics."""

import math

import numpy as np
import pytest
import torch

from conftest import DEVICE, HAS_CUDA, requires_cpu_ext, requires_cuda_ext, requires_triton
from fdm_fast import ops
from fdm_fast.ops import reference as R

# Published Philox4x32-10 known-answer vectors (Random123 kat_vectors): counter, key -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,want", KAT)
def test_philox_known_answers(counter, key, want):
    t = [torch.tensor([v], dtype=torch.int64) for v in (*counter, *key)]
    got = tuple(int(o) for o in R.philox4x32_10(*t))
    assert got == want, [f"{g:08x}" for g in got]


def test_philox_vectorised_equals_scalar():
    # Many counters at once give what each gives alone (no cross-talk in the vectorised limbs).
    c = torch.tensor([0, 1, 2**32 - 1, 12345, 2**31], dtype=torch.int64)
    k0, k1 = torch.tensor(7), torch.tensor(2**32 - 3)
    z = torch.zeros_like(c)
    batch = R.philox4x32_10(c, z, z, z, k0, k1)
    for i in range(len(c)):
        one = R.philox4x32_10(c[i:i + 1], z[:1], z[:1], z[:1], k0, k1)
        assert all(int(b[i]) == int(o[0]) for b, o in zip(batch, one))


SHAPES = [(1, 3, 17, 19), (5, 3, 17, 19), (2, 3, 32, 32), (7,), (3, 5)]


@requires_triton
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed,offset", [(0, 0), (12345678901, 5), (2**63 - 1, 2**32 - 3)])
def test_torch_and_triton_give_the_same_noise(shape, seed, offset):
    a = ops.randn(shape, seed=seed, offset=offset, device=DEVICE, backend="torch")
    b = ops.randn(shape, seed=seed, offset=offset, device=DEVICE, backend="triton")
    assert (a - b).abs().max().item() <= 1e-5


@requires_cpu_ext
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed,offset", [(0, 0), (12345678901, 5), (2**63 - 1, 2**32 - 3)])
def test_torch_and_cpu_give_the_same_noise(shape, seed, offset):
    a = ops.randn(shape, seed=seed, offset=offset, backend="torch")
    b = ops.randn(shape, seed=seed, offset=offset, backend="cpu")
    assert (a - b).abs().max().item() <= 1e-5
    seeds = torch.arange(shape[0], dtype=torch.int64) * 977 + seed % 1000
    a = ops.randn(shape, seed=seeds, offset=offset, backend="torch")
    b = ops.randn(shape, seed=seeds, offset=offset, backend="cpu")
    assert (a - b).abs().max().item() <= 1e-5


@requires_cuda_ext
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_gives_the_same_noise_as_torch_and_triton(shape):
    a = ops.randn(shape, seed=77, offset=3, device="cuda", backend="torch")
    b = ops.randn(shape, seed=77, offset=3, device="cuda", backend="cuda")
    c = ops.randn(shape, seed=77, offset=3, device="cuda", backend="triton")
    assert (a - b).abs().max().item() <= 1e-5 and (b - c).abs().max().item() <= 1e-5


@requires_triton
def test_per_sample_seeds_torch_and_triton():
    seeds = torch.tensor([3, 7, 2**40 + 1], dtype=torch.int64, device=DEVICE)
    a = ops.randn((3, 3, 17, 19), seed=seeds, offset=9, device=DEVICE, backend="torch")
    b = ops.randn((3, 3, 17, 19), seed=seeds, offset=9, device=DEVICE, backend="triton")
    assert (a - b).abs().max().item() <= 1e-5


def test_contract_element_mapping():
    # Element i is component i % 4 of counter offset + i // 4: check against randn4x directly.
    seed, off = 99, 1000
    n = ops.randn((2, 3, 5, 7), seed=seed, offset=off, backend="torch").reshape(-1)
    for i in [0, 1, 2, 3, 4, 5, 101, 209]:
        comps = R.randn4x(torch.tensor(seed), torch.tensor(off + i // 4))
        assert n[i].item() == comps[i % 4].item()


def test_per_sample_seed_is_its_own_stream():
    seeds = torch.tensor([3, 7], dtype=torch.int64)
    both = ops.randn((2, 3, 5, 5), seed=seeds, backend="torch")
    alone = ops.randn((1, 3, 5, 5), seed=seeds[1:], backend="torch")
    assert torch.equal(both[1], alone[0])
    # ... which is the shared-seed stream of a one-sample tensor with that seed
    assert torch.equal(alone, ops.randn((1, 3, 5, 5), seed=7, backend="torch"))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton),
                                     pytest.param("cpu", marks=requires_cpu_ext)])
def test_channels_last_gives_the_same_values(backend):
    if backend == "cpu" and HAS_CUDA:
        pytest.skip("the cpu backend runs CPU tensors; this machine's tests use the GPU")
    y = torch.randn(5, 3, 17, 19, device=DEVICE)
    a = ops.perturb(y, 2.0, "ve", seed=11, backend=backend)  # ve: c_in = 1, so net_in = y + 2 n
    b = ops.perturb(y.contiguous(memory_format=torch.channels_last), 2.0, "ve", seed=11, backend=backend)
    assert b.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a, b.contiguous())
    n = ops.randn(y.shape, seed=11, device=DEVICE, backend="torch")
    assert (a - (y + 2 * n)).abs().max().item() <= 1e-5


def _normal_cdf(x):
    return 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def test_statistics_of_a_million_draws():
    n = ops.randn((1_000_000,), seed=2024, backend="torch").double().numpy()
    assert abs(n.mean()) < 5 / math.sqrt(n.size)  # 5 standard errors
    assert abs(n.var() - 1) < 5 * math.sqrt(2 / n.size)
    # Kolmogorov-Smirnov against N(0, 1): D * sqrt(n) > 1.95 has probability 0.001 under the null.
    xs = np.sort(n)
    cdf = _normal_cdf(xs)
    i = np.arange(1, xs.size + 1)
    d = max(np.max(i / xs.size - cdf), np.max(cdf - (i - 1) / xs.size))
    assert d * math.sqrt(xs.size) < 1.95, d
    # neighbours within a Philox group are uncorrelated
    g = n.reshape(-1, 4)
    assert abs(np.corrcoef(g[:, 0], g[:, 1])[0, 1]) < 5 / math.sqrt(g.shape[0])
    assert abs(np.corrcoef(g[:, 0], g[:, 2])[0, 1]) < 5 / math.sqrt(g.shape[0])


def test_distinct_seeds_and_offsets_differ():
    a = ops.randn((4096,), seed=1, backend="torch")
    b = ops.randn((4096,), seed=2, backend="torch")
    c = ops.randn((4096,), seed=1, offset=1024, backend="torch")
    d = ops.randn((4096,), seed=1 + 2**32, backend="torch")  # the key's high word matters
    for other in (b, d):
        assert (a != other).float().mean() > 0.99
        assert abs(np.corrcoef(a.numpy(), other.numpy())[0, 1]) < 0.1
    # the offset is in counters (4 elements each): offset 1024 continues the stream 4096 further on
    assert (c != a).float().mean() > 0.99
    assert torch.equal(ops.randn((8192,), seed=1, backend="torch")[4096:], c)
