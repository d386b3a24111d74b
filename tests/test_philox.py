"""The reference Philox stream, pinned against Random123's known answers and Triton's own tl.rand."""
import os

import pytest
import torch

from stochdepth_kernels import reference

# Random123 kat_vectors, philox4x32_10: (counter, key, output).
RANDOM123_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
# Seeds exercising both 32-bit halves of the key, and the extremes of the seed range.
SEEDS = (0, 1, 0xFFFFFFFF, 2**32 + 7, 0x7ABCDEF012345678, 2**63 - 2)


def _words(values):
    return tuple(torch.tensor([v], dtype=torch.int64) for v in values)


@pytest.mark.parametrize("counter, key, expected", RANDOM123_KAT)
def test_philox4x32_10_matches_random123_known_answers(counter, key, expected):
    out = reference.philox4x32_10(_words(counter), _words(key))
    assert tuple(int(w) for w in out) == expected


def test_uniform_mapping_edges():
    bits = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1], dtype=torch.int64)
    u = reference.uint32_to_uniform_float(bits)
    assert u.dtype == torch.float32
    assert u[0] == 0 and u[4] == 0  # 0 and 0xFFFFFFFF (int32 -1, folded to 0)
    assert u[2] == u[3] and u[2] < 1.0  # the largest folded value stays below 1 in float32
    assert (u >= 0).all() and (u < 1).all()


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def triton_device(request):
    """Where Triton's own tl.rand runs: the interpreter on CPU tensors, the compiler on a GPU."""
    if request.param == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton runs CPU tensors only under TRITON_INTERPRET=1 (set where there is no GPU)")
    return request.param


def _triton_random(seed: int, counters: torch.Tensor, device: str):
    triton = pytest.importorskip("triton")
    tl = pytest.importorskip("triton.language")

    @triton.jit
    def kernel(seed_ptr, counter_ptr, uniform_ptr, bits_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        in_range = offsets < n
        counter = tl.load(counter_ptr + offsets, mask=in_range)
        seed = tl.load(seed_ptr)
        tl.store(uniform_ptr + offsets, tl.rand(seed, counter), mask=in_range)
        tl.store(bits_ptr + offsets, tl.randint(seed, counter), mask=in_range)

    counters = counters.to(device)
    uniform = torch.empty(counters.shape, dtype=torch.float32, device=device)
    bits = torch.empty(counters.shape, dtype=torch.int32, device=device)
    seed_t = torch.tensor([seed], dtype=torch.int64, device=device)
    kernel[(triton.cdiv(counters.numel(), 128),)](seed_t, counters, uniform, bits, counters.numel(), BLOCK=128)
    return seed_t, counters, uniform, bits


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("counter_start", [0, 2**32 - 100, 2**40 + 3])
def test_reference_equals_triton_rand_bit_for_bit(triton_device, seed, counter_start):
    counters = torch.arange(counter_start, counter_start + 300, dtype=torch.int64)
    seed_t, counters, uniform, bits = _triton_random(seed, counters, triton_device)
    expected_uniform = reference.philox_uniform(seed_t, counters)
    assert torch.equal(uniform, expected_uniform)
    zero = torch.zeros_like(counters)
    words = reference.philox4x32_10((counters & 0xFFFFFFFF, counters >> 32, zero, zero),
                                    (seed_t & 0xFFFFFFFF, seed_t >> 32))
    assert torch.equal(bits.long() & 0xFFFFFFFF, words[0])
