"""Pieces every Triton kernel of fdm_fast shares: in-kernel coefficients, noise tiles, addressing.

Grid: one flat axis of ``B * NPROG`` programs, ``NPROG`` per sample (no 65,535 limit on the batch);
program ``pid`` works on sample ``pid // NPROG``, so its sigma and coefficients are scalars, computed
once. A program owns a tile of one sample, walked in memory order:

- contiguous tensors (any rank): a [ROWS, 4] tile of consecutive elements ``j``, one 16-byte access
  per row for fp32, and one Philox call per row (the noise contract gives the four outputs of
  counter ``c`` to logical elements ``4c .. 4c+3``);
- channels_last 4-D tensors: a [ROWS, 4, CP] tile of ``4 * ROWS`` consecutive pixels ``hw`` by all
  ``C`` channels (``CP``: C rounded up to a power of two), i.e. a contiguous stretch of memory; the
  logical (NCHW) index the noise contract needs is ``c * HW + hw``, found without a division, and
  with ``HW % 4 == 0`` four consecutive pixels of one channel still share one Philox call.

ROWS shrinks for small samples so that a program is not mostly masked lanes. Indices within a
sample are int32 (the host checks a sample has fewer than 2^31 elements); sample bases are int64.

The noise is Philox4x32-10 written here on explicit uint32 words, not ``tl.randn4x``: before Triton
3.4, ``tl.randn4x`` with a 64-bit counter switched to Philox4x64, so the noise would have depended
on the Triton version. Same words, rounds and uniform/Box-Muller recipe as the noise contract.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # a Triton without the interpreter
    InterpretedFunction = None

MAX_ROWS = 256  # rows of 4 elements per program: 1024 elements with 4 warps
TILE = 4 * MAX_ROWS

_PHILOX_M0 = tl.constexpr(0xD2511F53)  # round multipliers
_PHILOX_M1 = tl.constexpr(0xCD9E8D57)
_PHILOX_W0 = tl.constexpr(0x9E3779B9)  # key increments
_PHILOX_W1 = tl.constexpr(0xBB67AE85)


@triton.jit
def coefficients(s, KIND: tl.constexpr, FDM: tl.constexpr, sd, smin, smax, m, fbm, fbd):
    """(c_skip, c_out, c_in, lambda) at the scalar noise level ``s`` (float32), docs/design.md 1.

    KIND: 0 vp, 1 ve, 2 edm (schedules.KIND_*). FDM swaps c_in for exp(-m B)(1 + m B),
    B = fbm tau + fbd tau^2 / 2, tau = (s - smin) / (smax - smin).
    """
    s2 = s * s
    if KIND == 0:  # vp
        c_skip = s * 0.0 + 1.0
        c_out = -s
        weight = 1.0 / s2
    elif KIND == 1:  # ve
        c_skip = s * 0.0 + 1.0
        c_out = s
        weight = 1.0 / s2
    else:  # edm
        sd2 = sd * sd
        c_skip = sd2 / (s2 + sd2)
        c_out = s * sd / tl.sqrt_rn(s2 + sd2)
        weight = (s2 + sd2) / (s2 * sd2)
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


# ----------------------------------------------------------------------------------------------
# The noise contract on uint32 words.


@triton.jit
def _uniform(x):
    """uint32 -> float32 in [0, 1): bit-cast to int32, fold negatives with ~x, scale."""
    x = x.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)
    return x.to(tl.float32) * 4.6566127342e-10


@triton.jit
def _log_poly(u):
    """Natural log of a positive normal float32, as ``log_poly`` in csrc/include/fdm_math.h: the
    exponent from the bits, then log(m) = f q(f) on m in [sqrt(1/2), sqrt(2)) (|error| < 5e-8)."""
    ix = u.to(tl.int32, bitcast=True) - 0x3F3504F3  # bits of sqrt(1/2)
    e = ix >> 23  # arithmetic shift
    f = ((ix & 0x7FFFFF) + 0x3F3504F3).to(tl.float32, bitcast=True) - 1.0
    q = 1.0 + f * (-4.999998808e-01 + f * (3.333418369e-01 + f * (-2.500215471e-01 + f * (1.995697767e-01 + f * (
        -1.656069607e-01 + f * (1.494909525e-01 + f * (-1.437733024e-01 + f * 8.743945509e-02)))))))
    return e.to(tl.float32) * 0.693147180559945 + f * q


@triton.jit
def _sincos_2pi(u):
    """(sin, cos)(2 pi u) for u in [0, 1), as ``sincos_2pi_poly`` in fdm_math.h: the nearest quarter
    turn q, Taylor series on x = 2 pi (u - q/4) in [-pi/4, pi/4] (errors < 1e-9), a rotation by q."""
    q = (4.0 * u + 0.5).to(tl.int32)  # truncation is floor for u >= 0
    x = (u - 0.25 * q.to(tl.float32)) * 6.283185307179586
    x2 = x * x
    s = x * (1.0 + x2 * (-1.0 / 6 + x2 * (1.0 / 120 + x2 * (-1.0 / 5040 + x2 * (1.0 / 362880 + x2 * (
        -1.0 / 39916800))))))
    c = 1.0 + x2 * (-0.5 + x2 * (1.0 / 24 + x2 * (-1.0 / 720 + x2 * (1.0 / 40320 + x2 * (-1.0 / 3628800 + x2 * (
        1.0 / 479001600))))))
    odd = (q & 1) != 0
    a = tl.where(odd, c, s)
    b = tl.where(odd, s, c)
    return tl.where((q & 2) != 0, -a, a), tl.where(((q + 1) & 2) != 0, -b, b)


@triton.jit
def _box_muller(u1, u2):
    # The CPU kernels' branch-free polynomials, not libdevice's logf/sinf/cosf: those carry a general
    # range reduction (and its slow path) for arguments Box-Muller never makes.
    u1 = tl.maximum(1.0e-7, u1)
    r = tl.sqrt(-2.0 * _log_poly(u1))
    s, c = _sincos_2pi(u2)
    return r * c, r * s


@triton.jit
def randn4(seed, cnt):
    """Four float32 normals per int64 counter ``cnt`` at the int64 key ``seed`` (a scalar).

    Philox4x32-10: key (seed_lo, seed_hi), counter (cnt_lo, cnt_hi, 0, 0), all uint32 words.
    """
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = (cnt & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((cnt >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = c0 * 0
    c3 = c0 * 0
    for _ in tl.static_range(10):
        a0 = c0
        a2 = c2
        c0 = tl.umulhi(a2, _PHILOX_M1) ^ c1 ^ k0
        c2 = tl.umulhi(a0, _PHILOX_M0) ^ c3 ^ k1
        c1 = a2 * _PHILOX_M1
        c3 = a0 * _PHILOX_M0
        k0 = k0 + _PHILOX_W0
        k1 = k1 + _PHILOX_W1
    n0, n1 = _box_muller(_uniform(c0), _uniform(c1))
    n2, n3 = _box_muller(_uniform(c2), _uniform(c3))
    return n0, n1, n2, n3


@triton.jit
def _pick(comp, n0, n1, n2, n3):
    return tl.where(comp == 0, n0, tl.where(comp == 1, n1, tl.where(comp == 2, n2, n3)))


# ----------------------------------------------------------------------------------------------
# Tiles.


@triton.jit
def tile(P, HW, C, NPROG, CHANNELS_LAST: tl.constexpr, CP: tl.constexpr, ROWS: tl.constexpr):
    """(b, q, mask, addr, j) of this program: sample b, the program's index q within the sample,
    the in-bounds mask, memory offsets (int64) and logical NCHW indices j within the sample (int32).

    Contiguous: [ROWS, 4] tiles; channels_last: [ROWS, 4, CP] (pixels x channels, memory order).
    """
    pid = tl.program_id(0)
    b = pid // NPROG
    q = pid - b * NPROG
    base = b.to(tl.int64) * P
    if CHANNELS_LAST:
        r = tl.arange(0, ROWS)[:, None, None]
        k = tl.arange(0, 4)[None, :, None]
        c = tl.arange(0, CP)[None, None, :]
        hw = q * (4 * ROWS) + r * 4 + k
        mask = (hw < HW) & (c < C)
        addr = base + (hw * C + c)
        j = c * HW + hw
    else:
        r = tl.arange(0, ROWS)[:, None]
        k = tl.arange(0, 4)[None, :]
        j = q * (4 * ROWS) + r * 4 + k
        mask = j < P
        addr = base + j
    return b, q, mask, addr, j


@triton.jit
def noise(rng_ptr, b, q, j, HW, IDX_PER_SAMPLE, RNG_STRIDE, CHANNELS_LAST: tl.constexpr, CP: tl.constexpr,
          ROWS: tl.constexpr, ALIGNED: tl.constexpr):
    """Normals of the noise contract for the tile (float32, the tile's shape).

    rng holds int64 (seed, offset) rows; RNG_STRIDE is 2 for per-sample rows, 0 for one shared row.
    The logical index is i = b * IDX_PER_SAMPLE + j (IDX_PER_SAMPLE = P for a shared row, 0 for
    per-sample rows). ALIGNED (the host's promise that i is 4-aligned at every row start: P % 4 == 0
    or per-sample rows for contiguous tiles; additionally HW % 4 == 0 for channels_last) lets one
    Philox call serve 4 elements; otherwise each element computes its own counter (4x the Philox work).
    """
    seed = tl.load(rng_ptr + b * RNG_STRIDE)
    off = tl.load(rng_ptr + b * RNG_STRIDE + 1)
    i0 = b.to(tl.int64) * IDX_PER_SAMPLE
    if ALIGNED:
        if CHANNELS_LAST:
            r = tl.arange(0, ROWS)[:, None, None]
            c = tl.arange(0, CP)[None, None, :]
            k = tl.arange(0, 4)[None, :, None]
            cnt = off + (i0 + (c * HW).to(tl.int64)) // 4 + (q * ROWS + r).to(tl.int64)
        else:
            r = tl.arange(0, ROWS)[:, None]
            k = tl.arange(0, 4)[None, :]
            cnt = off + i0 // 4 + (q * ROWS + r).to(tl.int64)
        n0, n1, n2, n3 = randn4(seed, cnt)
        return _pick(k, n0, n1, n2, n3)
    else:
        i = i0 + j.to(tl.int64)
        n0, n1, n2, n3 = randn4(seed, off + i // 4)
        return _pick(i % 4, n0, n1, n2, n3)


# ----------------------------------------------------------------------------------------------
# Host side.


def traceable(kernel):
    """``torch.library.wrap_triton(kernel)``: a launch that ``torch.compile`` can trace through.

    Under Triton's interpreter (``TRITON_INTERPRET=1``, how the CPU tests run the kernels) ``triton.jit``
    gives an ``InterpretedFunction``, which has nothing to trace; torch 2.13 returns such a kernel as it
    is, while torch 2.11 (the H200's) raises ("wrap_triton only works on functions annotated with
    triton.jit"). Returning it unwrapped here gives every torch version 2.13's behaviour."""
    if InterpretedFunction is not None and isinstance(kernel, InterpretedFunction):
        return kernel
    return wrap_triton(kernel)


def is_channels_last(t: torch.Tensor) -> bool:
    """A 4-D tensor laid out channels_last and not also contiguous (size-1 dims never count)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


class Launch:
    """Grid and constexprs of one launch over a [B, ...] tensor ``t`` (contiguous or channels_last)."""

    def __init__(self, t: torch.Tensor, rng: torch.Tensor = None):
        B = t.shape[0]
        P = t.numel() // max(B, 1)
        if P >= 2**31:
            raise ValueError(f"expected fewer than 2^31 elements per sample, got {P} (shape {tuple(t.shape)})")
        self.B, self.P = B, P
        self.cl = is_channels_last(t)
        if self.cl:
            self.C, self.HW = t.shape[1], t.shape[2] * t.shape[3]
            self.CP = triton.next_power_of_2(self.C)
            per_row = 4 * self.CP
            span = self.HW
        else:
            self.C, self.HW, self.CP = 1, P, 1
            per_row = 4
            span = P
        # rows per program: at most MAX_ROWS x 4 elements, no more rows than the sample has
        rows = max(1, min(triton.next_power_of_2(triton.cdiv(span, 4)), max(1, TILE // per_row)))
        self.ROWS = rows
        self.nprog = triton.cdiv(span, 4 * rows)
        elems = rows * per_row
        self.num_warps = max(1, min(4, elems // 256))
        self.grid = (B * self.nprog,)
        if rng is not None:
            if rng.shape[0] == 1:  # one shared row: logical index over the whole tensor
                self.idx_per_sample, self.rng_stride = P, 0
                aligned = P % 4 == 0 or B == 1
            else:
                self.idx_per_sample, self.rng_stride = 0, 2
                aligned = True
            self.aligned = aligned and (not self.cl or self.HW % 4 == 0)

    def geometry(self):
        """(P, HW, C, NPROG): the runtime geometry arguments of every kernel."""
        return self.P, self.HW, self.C, self.nprog

    def consts(self):
        return dict(CHANNELS_LAST=self.cl, CP=self.CP, ROWS=self.ROWS, num_warps=self.num_warps)


# Tests set this to fill every output with NaN before a kernel runs, so an unwritten element fails.
POISON = False


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if POISON else out


def empty_like_layout(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An output in t's layout, allocated in that layout directly (no extra pass)."""
    fmt = torch.channels_last if is_channels_last(t) else torch.contiguous_format
    out = torch.empty(t.shape, dtype=dtype, device=t.device, memory_format=fmt)
    return out.fill_(float("nan")) if POISON else out
