"""Pieces every Triton kernel of fdm_fast shares: in-kernel coefficients, noise tiles, addressing.

Tiling: a program owns ``4 * ROWS`` consecutive logical elements of one sample, held as a
[ROWS, 4] tile, so one Philox call feeds the four elements of a row (the noise contract gives the
four outputs of counter ``c`` to logical elements ``4c .. 4c+3``) and every row is one 16-byte
access for fp32 contiguous tensors. The grid is ``(cdiv(P, 4 * ROWS), B)`` with ``P`` the elements
per sample, so each program's sigma and coefficients are scalars, computed once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Rows per program (x4 elements). 256 rows = 1024 elements per program with 4 warps.
ROWS = 256
NUM_WARPS = 4


@triton.jit
def coefficients(s, KIND: tl.constexpr, FDM: tl.constexpr, sd, smin, smax, m, fbm, fbd):
    """(c_skip, c_out, c_in, lambda) at the scalar noise level ``s`` (float32), DESIGN 1.1-1.2.

    KIND: 0 vp, 1 ve, 2 edm (schedules.KIND_*). FDM swaps c_in for exp(-m B)(1 + m B),
    B = fbm tau + fbd tau^2 / 2, tau = (s - smin) / (smax - smin).
    """
    s2 = s * s
    if KIND == 0:  # vp
        c_skip = s * 0.0 + 1.0
        c_out = -s
        c_in = 1.0 / tl.sqrt_rn(s2 + 1.0)
        weight = 1.0 / s2
    elif KIND == 1:  # ve
        c_skip = s * 0.0 + 1.0
        c_out = s
        c_in = s * 0.0 + 1.0
        weight = 1.0 / s2
    else:  # edm
        sd2 = sd * sd
        c_skip = sd2 / (s2 + sd2)
        c_out = s * sd / tl.sqrt_rn(s2 + sd2)
        c_in = 1.0 / tl.sqrt_rn(s2 + sd2)
        weight = (s2 + sd2) / (s2 * sd2)
    if FDM:
        c_in = c_in_only(s, KIND, FDM, sd, smin, smax, m, fbm, fbd)
    return c_skip, c_out, c_in, weight


@triton.jit
def c_in_only(s, KIND: tl.constexpr, FDM: tl.constexpr, sd, smin, smax, m, fbm, fbd):
    """c_in alone (the same formulas as `coefficients`; valid at s = 0, the sampler's last level)."""
    if FDM:
        tau = (s - smin) / (smax - smin)
        mb = m * (fbm * tau + 0.5 * fbd * tau * tau)
        c_in = tl.exp(-mb) * (1.0 + mb)
    elif KIND == 0:
        c_in = 1.0 / tl.sqrt_rn(s * s + 1.0)
    elif KIND == 1:
        c_in = s * 0.0 + 1.0
    else:
        c_in = 1.0 / tl.sqrt_rn(s * s + sd * sd)
    return c_in


@triton.jit
def tile_index(pid, ROWS: tl.constexpr):
    """Row index [ROWS, 1], column [1, 4] and within-sample element index j [ROWS, 4] of a program."""
    r = tl.arange(0, ROWS)[:, None]
    k = tl.arange(0, 4)[None, :]
    j = pid.to(tl.int64) * (4 * ROWS) + r * 4 + k
    return r, k, j


@triton.jit
def tile_address(b, j, P, HW, C, CHANNELS_LAST: tl.constexpr):
    """Memory offset of logical element j of sample b, for NCHW-contiguous or channels_last tensors."""
    base = b.to(tl.int64) * P
    if CHANNELS_LAST:
        return base + (j % HW) * C + j // HW
    return base + j


@triton.jit
def noise_tile(rng_ptr, b, pid, r, k, j, IDX_PER_SAMPLE, RNG_STRIDE, ROWS: tl.constexpr, ALIGNED: tl.constexpr):
    """Normals of the noise contract for the tile (float32 [ROWS, 4]).

    rng holds (seed, offset) rows; RNG_STRIDE is 2 for per-sample rows and 0 for one shared row.
    The logical index is i = b * IDX_PER_SAMPLE + j (IDX_PER_SAMPLE = P for one shared row, 0 for
    per-sample rows). ALIGNED (i of a tile's first element divisible by 4) lets one Philox call serve
    the 4 elements of a row; otherwise every element computes its own counter (4x the Philox work,
    only for per-sample sizes not divisible by 4 with a shared row).
    """
    seed = tl.load(rng_ptr + b * RNG_STRIDE)
    off = tl.load(rng_ptr + b * RNG_STRIDE + 1)
    i0 = b.to(tl.int64) * IDX_PER_SAMPLE
    if ALIGNED:
        cnt = off + i0 // 4 + pid.to(tl.int64) * ROWS + r
        comp = k
    else:
        i = i0 + j
        cnt = off + i // 4
        comp = i % 4
    n0, n1, n2, n3 = tl.randn4x(seed, cnt)
    return tl.where(comp == 0, n0, tl.where(comp == 1, n1, tl.where(comp == 2, n2, n3)))


# ----------------------------------------------------------------------------------------------
# Host-side helpers.


def is_channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def geometry(t: torch.Tensor):
    """(B, P, HW, C, channels_last) of a tensor whose dim 0 is the batch."""
    B = t.shape[0]
    P = t.numel() // max(B, 1)
    if t.dim() == 4:
        C, HW = t.shape[1], t.shape[2] * t.shape[3]
    else:
        C, HW = 1, P
    return B, P, HW, C, is_channels_last(t)


# Tests set this to fill every output with NaN before a kernel runs, so an unwritten element fails.
POISON = False


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if POISON else out


def empty_like_layout(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    fmt = torch.channels_last if is_channels_last(t) else torch.contiguous_format
    out = torch.empty(t.shape, dtype=dtype, device=t.device).contiguous(memory_format=fmt)
    return out.fill_(float("nan")) if POISON else out


def rng_geometry(rng: torch.Tensor, P: int, B: int):
    """(IDX_PER_SAMPLE, RNG_STRIDE, ALIGNED) for the launch (see noise_tile)."""
    if rng.shape[0] == 1:
        return P, 0, P % 4 == 0 or B == 1
    return 0, 2, True


def grid(P: int, B: int):
    return (triton.cdiv(P, 4 * ROWS), B)
