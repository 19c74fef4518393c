"""Triton: the weighted denoising loss in one pass forward and one pass backward.

forward:   L_b = w_b * sum_j (D_j - y_j)^2,  D = c_skip x + c_out F,  x = y + sigma_b n,
           w_b = min(lambda(sigma_b), clamp)
backward:  dL/dF = g_b * w_b * 2 (D - y) c_out

The noise is regenerated from (seed, offset) in both passes instead of being stored. Each program
writes one partial sum; the [B, programs] partials are summed on the host (deterministic, no atomics).
"""

from typing import List, Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from . import triton_common as tc


@triton.jit
def _loss_diff(F_ptr, y_ptr, sigma_ptr, SIGMA_STRIDE, rng_ptr, noise_ptr, clamp_ptr, b, q, j, mask, addr,
               HW, IDX_PER_SAMPLE, RNG_STRIDE, sd, smin, smax, m, fbm, fbd,
               KIND: tl.constexpr, FDM: tl.constexpr, HAS_NOISE: tl.constexpr, CHANNELS_LAST: tl.constexpr,
               CP: tl.constexpr, ALIGNED: tl.constexpr, ROWS: tl.constexpr):
    """(D - y, w, c_out) for a tile; masked lanes give D - y = 0."""
    s = tl.load(sigma_ptr + b * SIGMA_STRIDE).to(tl.float32)
    c_skip, c_out, _, w = tc.coefficients(s, KIND, FDM, sd, smin, smax, m, fbm, fbd)
    w = tl.minimum(w, tl.load(clamp_ptr).to(tl.float32))
    y = tl.load(y_ptr + addr, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(F_ptr + addr, mask=mask, other=0.0).to(tl.float32)
    if HAS_NOISE:
        n = tl.load(noise_ptr + addr, mask=mask, other=0.0).to(tl.float32)
    else:
        n = tc.noise(rng_ptr, b, q, j, HW, IDX_PER_SAMPLE, RNG_STRIDE, CHANNELS_LAST, CP, ROWS, ALIGNED)
    x = y + s * n
    diff = c_skip * x + c_out * f - y
    return tl.where(mask, diff, 0.0), w, c_out


@triton.jit
def _loss_fwd_kernel(F_ptr, y_ptr, sigma_ptr, SIGMA_STRIDE, rng_ptr, noise_ptr, clamp_ptr, partial_ptr,
                     P, HW, C, NPROG, IDX_PER_SAMPLE, RNG_STRIDE, sd, smin, smax, m, fbm, fbd,
                     KIND: tl.constexpr, FDM: tl.constexpr, HAS_NOISE: tl.constexpr,
                     CHANNELS_LAST: tl.constexpr, CP: tl.constexpr, ALIGNED: tl.constexpr, ROWS: tl.constexpr):
    b, q, mask, addr, j = tc.tile(P, HW, C, NPROG, CHANNELS_LAST, CP, ROWS)
    diff, w, _ = _loss_diff(F_ptr, y_ptr, sigma_ptr, SIGMA_STRIDE, rng_ptr, noise_ptr, clamp_ptr, b, q, j, mask,
                            addr, HW, IDX_PER_SAMPLE, RNG_STRIDE, sd, smin, smax, m, fbm, fbd,
                            KIND, FDM, HAS_NOISE, CHANNELS_LAST, CP, ALIGNED, ROWS)
    # partial[b, q] lives at the program's own flat index
    tl.store(partial_ptr + tl.program_id(0), w * tl.sum(diff * diff))


@triton.jit
def _loss_bwd_kernel(grad_ptr, F_ptr, y_ptr, sigma_ptr, SIGMA_STRIDE, rng_ptr, noise_ptr, clamp_ptr, dF_ptr,
                     P, HW, C, NPROG, IDX_PER_SAMPLE, RNG_STRIDE, sd, smin, smax, m, fbm, fbd,
                     KIND: tl.constexpr, FDM: tl.constexpr, HAS_NOISE: tl.constexpr,
                     CHANNELS_LAST: tl.constexpr, CP: tl.constexpr, ALIGNED: tl.constexpr, ROWS: tl.constexpr):
    b, q, mask, addr, j = tc.tile(P, HW, C, NPROG, CHANNELS_LAST, CP, ROWS)
    diff, w, c_out = _loss_diff(F_ptr, y_ptr, sigma_ptr, SIGMA_STRIDE, rng_ptr, noise_ptr, clamp_ptr, b, q, j,
                                mask, addr, HW, IDX_PER_SAMPLE, RNG_STRIDE, sd, smin, smax, m, fbm, fbd,
                                KIND, FDM, HAS_NOISE, CHANNELS_LAST, CP, ALIGNED, ROWS)
    g = tl.load(grad_ptr + b).to(tl.float32)
    tl.store(dF_ptr + addr, (g * w * 2.0 * c_out * diff).to(dF_ptr.dtype.element_ty), mask=mask)


def _launch_args(F, y, sigma, rng, noise, clamp, params):
    L = tc.Launch(F, rng)
    sd, _, _, smin, smax, m, fbm, fbd = params
    tensors = (F, y, sigma, 1 if sigma.numel() > 1 else 0, rng, noise if noise is not None else F, clamp)
    scalars = (*L.geometry(), L.idx_per_sample, L.rng_stride, sd, smin, smax, m, fbm, fbd)
    return L, tensors, scalars


@triton_op("fdm_fast_triton::loss_fwd", mutates_args=())
def loss_fwd(F: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor, rng: torch.Tensor, noise: Optional[torch.Tensor],
             clamp: torch.Tensor, kind: int, fdm: bool, params: List[float]) -> torch.Tensor:
    L, tensors, scalars = _launch_args(F, y, sigma, rng, noise, clamp, params)
    partial = tc.empty((L.B, L.nprog), torch.float32, F.device)
    tc.traceable(_loss_fwd_kernel)[L.grid](*tensors, partial, *scalars, KIND=kind, FDM=fdm,
                                           HAS_NOISE=noise is not None, ALIGNED=L.aligned, **L.consts())
    return partial.sum(dim=1)


@triton_op("fdm_fast_triton::loss_bwd", mutates_args=())
def loss_bwd(grad: torch.Tensor, F: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor, rng: torch.Tensor,
             noise: Optional[torch.Tensor], clamp: torch.Tensor, kind: int, fdm: bool,
             params: List[float]) -> torch.Tensor:
    L, tensors, scalars = _launch_args(F, y, sigma, rng, noise, clamp, params)
    dF = tc.empty_like_layout(F, F.dtype)
    tc.traceable(_loss_bwd_kernel)[L.grid](grad.float().contiguous(), *tensors, dF, *scalars, KIND=kind, FDM=fdm,
                                           HAS_NOISE=noise is not None, ALIGNED=L.aligned, **L.consts())
    return dF


def _setup_context(ctx, inputs, output):
    F, y, sigma, rng, noise, clamp, kind, fdm, params = inputs
    ctx.save_for_backward(F, y, sigma, rng, noise, clamp)
    ctx.spec = (kind, fdm, params)


def _backward(ctx, grad):
    F, y, sigma, rng, noise, clamp = ctx.saved_tensors
    dF = loss_bwd(grad, F, y, sigma, rng, noise, clamp, *ctx.spec)
    return dF, None, None, None, None, None, None, None, None


loss_fwd.register_autograd(_backward, setup_context=_setup_context)
