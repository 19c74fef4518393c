"""Triton: the training input in one pass, and the noise contract as a standalone op.

perturb:  x = y + sigma n,  net_in = c_in(sigma) x   (n regenerated from (seed, offset) or loaded)
randn:    n under the noise contract
"""

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from . import triton_common as tc


@triton.jit
def _perturb_kernel(y_ptr, sigma_ptr, SIGMA_STRIDE, rng_ptr, noise_ptr, net_ptr, x_ptr,
                    P, HW, C, NPROG, IDX_PER_SAMPLE, RNG_STRIDE,
                    sd, smin, smax, m, fbm, fbd,
                    KIND: tl.constexpr, FDM: tl.constexpr, HAS_NOISE: tl.constexpr, WRITE_X: tl.constexpr,
                    CHANNELS_LAST: tl.constexpr, CP: tl.constexpr, ALIGNED: tl.constexpr, ROWS: tl.constexpr):
    """net_in = c_in(sigma_b) * (y + sigma_b * n);  x = y + sigma_b * n (float32, if WRITE_X)."""
    b, q, mask, addr, j = tc.tile(P, HW, C, NPROG, CHANNELS_LAST, CP, ROWS)
    s = tl.load(sigma_ptr + b * SIGMA_STRIDE).to(tl.float32)
    c_in = tc.c_in_only(s, KIND, FDM, sd, smin, smax, m, fbm, fbd)
    y = tl.load(y_ptr + addr, mask=mask, other=0.0).to(tl.float32)
    if HAS_NOISE:
        n = tl.load(noise_ptr + addr, mask=mask, other=0.0).to(tl.float32)
    else:
        n = tc.noise(rng_ptr, b, q, j, HW, IDX_PER_SAMPLE, RNG_STRIDE, CHANNELS_LAST, CP, ROWS, ALIGNED)
    x = y + s * n
    tl.store(net_ptr + addr, (c_in * x).to(net_ptr.dtype.element_ty), mask=mask)
    if WRITE_X:
        tl.store(x_ptr + addr, x, mask=mask)


@triton.jit
def _randn_kernel(out_ptr, rng_ptr, P, HW, C, NPROG, IDX_PER_SAMPLE, RNG_STRIDE,
                  CHANNELS_LAST: tl.constexpr, CP: tl.constexpr, ALIGNED: tl.constexpr, ROWS: tl.constexpr):
    b, q, mask, addr, j = tc.tile(P, HW, C, NPROG, CHANNELS_LAST, CP, ROWS)
    n = tc.noise(rng_ptr, b, q, j, HW, IDX_PER_SAMPLE, RNG_STRIDE, CHANNELS_LAST, CP, ROWS, ALIGNED)
    tl.store(out_ptr + addr, n, mask=mask)


@triton_op("fdm_fast_triton::perturb", mutates_args=())
def perturb(y: torch.Tensor, sigma: torch.Tensor, rng: torch.Tensor, noise: Optional[torch.Tensor],
            kind: int, fdm: bool, params: List[float], out_dtype: torch.dtype,
            write_x: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    L = tc.Launch(y, rng)
    net_in = tc.empty_like_layout(y, out_dtype)
    x = tc.empty_like_layout(y, torch.float32) if write_x else y.new_empty(0, dtype=torch.float32)
    sd, _, _, smin, smax, m, fbm, fbd = params
    tc.traceable(_perturb_kernel)[L.grid](
        y, sigma, 1 if sigma.numel() > 1 else 0, rng, noise if noise is not None else y, net_in, x,
        *L.geometry(), L.idx_per_sample, L.rng_stride, sd, smin, smax, m, fbm, fbd,
        KIND=kind, FDM=fdm, HAS_NOISE=noise is not None, WRITE_X=write_x, ALIGNED=L.aligned, **L.consts())
    return net_in, x


@triton_op("fdm_fast_triton::randn", mutates_args=())
def randn(shape: List[int], rng: torch.Tensor) -> torch.Tensor:
    out = tc.empty(shape, torch.float32, rng.device)
    # per-sample rows: B samples; one shared row: the whole tensor is one logical sample
    flat = out.view(shape[0], -1) if rng.shape[0] > 1 else out.view(1, -1)
    L = tc.Launch(flat, rng)
    tc.traceable(_randn_kernel)[L.grid](out, rng, *L.geometry(), L.idx_per_sample, L.rng_stride,
                                        ALIGNED=L.aligned, **L.consts())
    return out
