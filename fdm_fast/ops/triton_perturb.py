"""Triton: the training input in one pass, and the noise contract as a standalone op.

perturb:  x = y + sigma n,  net_in = c_in(sigma) x   (n regenerated from (seed, offset) or loaded)
randn:    n under the noise contract
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from . import triton_common as tc


@triton.jit
def _perturb_kernel(y_ptr, sigma_ptr, SIGMA_STRIDE, rng_ptr, noise_ptr, net_ptr, x_ptr,
                    P, HW, C, IDX_PER_SAMPLE, RNG_STRIDE,
                    sd, smin, smax, m, fbm, fbd,
                    KIND: tl.constexpr, FDM: tl.constexpr, HAS_NOISE: tl.constexpr, WRITE_X: tl.constexpr,
                    CHANNELS_LAST: tl.constexpr, ALIGNED: tl.constexpr, ROWS: tl.constexpr):
    """net_in = c_in(sigma_b) * (y + sigma_b * n);  x = y + sigma_b * n (float32, if WRITE_X)."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    r, k, j = tc.tile_index(pid, ROWS)
    mask = j < P
    addr = tc.tile_address(b, j, P, HW, C, CHANNELS_LAST)
    s = tl.load(sigma_ptr + b * SIGMA_STRIDE).to(tl.float32)
    c_in = tc.c_in_only(s, KIND, FDM, sd, smin, smax, m, fbm, fbd)
    y = tl.load(y_ptr + addr, mask=mask, other=0.0).to(tl.float32)
    if HAS_NOISE:
        n = tl.load(noise_ptr + addr, mask=mask, other=0.0).to(tl.float32)
    else:
        n = tc.noise_tile(rng_ptr, b, pid, r, k, j, IDX_PER_SAMPLE, RNG_STRIDE, ROWS, ALIGNED)
    x = y + s * n
    tl.store(net_ptr + addr, (c_in * x).to(net_ptr.dtype.element_ty), mask=mask)
    if WRITE_X:
        tl.store(x_ptr + addr, x, mask=mask)


@triton.jit
def _randn_kernel(out_ptr, rng_ptr, P, IDX_PER_SAMPLE, RNG_STRIDE, ALIGNED: tl.constexpr, ROWS: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    r, k, j = tc.tile_index(pid, ROWS)
    n = tc.noise_tile(rng_ptr, b, pid, r, k, j, IDX_PER_SAMPLE, RNG_STRIDE, ROWS, ALIGNED)
    tl.store(out_ptr + b.to(tl.int64) * P + j, n, mask=j < P)


@triton_op("fdm_fast_triton::perturb", mutates_args=())
def perturb(y: torch.Tensor, sigma: torch.Tensor, rng: torch.Tensor, noise: Optional[torch.Tensor],
            kind: int, fdm: bool, params: list[float], out_dtype: torch.dtype,
            write_x: bool) -> tuple[torch.Tensor, torch.Tensor]:
    B, P, HW, C, cl = tc.geometry(y)
    net_in = tc.empty_like_layout(y, out_dtype)
    x = tc.empty_like_layout(y, torch.float32) if write_x else y.new_empty(0, dtype=torch.float32)
    idx_per_sample, rng_stride, aligned = tc.rng_geometry(rng, P, B)
    sd, _, _, smin, smax, m, fbm, fbd = params
    wrap_triton(_perturb_kernel)[tc.grid(P, B)](
        y, sigma, 1 if sigma.numel() > 1 else 0, rng, noise if noise is not None else y, net_in, x,
        P, HW, C, idx_per_sample, rng_stride, sd, smin, smax, m, fbm, fbd,
        KIND=kind, FDM=fdm, HAS_NOISE=noise is not None, WRITE_X=write_x,
        CHANNELS_LAST=cl, ALIGNED=aligned, ROWS=tc.ROWS, num_warps=tc.NUM_WARPS)
    return net_in, x


@triton_op("fdm_fast_triton::randn", mutates_args=())
def randn(shape: list[int], rng: torch.Tensor) -> torch.Tensor:
    out = tc.empty(shape, torch.float32, rng.device)
    numel = out.numel()
    B = shape[0] if rng.shape[0] > 1 else 1
    P = numel // max(B, 1)
    idx_per_sample, rng_stride, aligned = tc.rng_geometry(rng, P, B)
    wrap_triton(_randn_kernel)[tc.grid(P, B)](out, rng, P, idx_per_sample, rng_stride,
                                             ALIGNED=aligned, ROWS=tc.ROWS, num_warps=tc.NUM_WARPS)
    return out
