"""Triton: the weighted denoising loss in one pass forward and one pass backward.

forward:   L_b = w_b * sum_j (D_j - y_j)^2,  D = c_skip x + c_out F,  x = y + sigma_b n,
           w_b = min(lambda(sigma_b), clamp)
backward:  dL/dF = g_b * w_b * 2 (D - y) c_out

When a gradient will be needed (``save_grad``) the forward also writes the unscaled gradient
G = 2 w c_out (D - y) in F's dtype and layout, and the backward is ``scale_grad``: dF = g_b G, a
streaming pass with no noise in it. That is what the compiled backends do (csrc/, DenoiseLoss): the
noise is drawn once per loss, never stored. Without it, the backward (``loss_bwd``) regenerates the
noise from (seed, offset). Each program of the forward writes one partial sum; the [B, programs]
partials are summed on the host (deterministic, no atomics).
"""

from typing import List, Optional, Tuple

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
def _loss_fwd_kernel(F_ptr, y_ptr, sigma_ptr, SIGMA_STRIDE, rng_ptr, noise_ptr, clamp_ptr, partial_ptr, G_ptr,
                     P, HW, C, NPROG, IDX_PER_SAMPLE, RNG_STRIDE, sd, smin, smax, m, fbm, fbd,
                     KIND: tl.constexpr, FDM: tl.constexpr, HAS_NOISE: tl.constexpr, SAVE_G: tl.constexpr,
                     CHANNELS_LAST: tl.constexpr, CP: tl.constexpr, ALIGNED: tl.constexpr, ROWS: tl.constexpr):
    b, q, mask, addr, j = tc.tile(P, HW, C, NPROG, CHANNELS_LAST, CP, ROWS)
    diff, w, c_out = _loss_diff(F_ptr, y_ptr, sigma_ptr, SIGMA_STRIDE, rng_ptr, noise_ptr, clamp_ptr, b, q, j,
                                mask, addr, HW, IDX_PER_SAMPLE, RNG_STRIDE, sd, smin, smax, m, fbm, fbd,
                                KIND, FDM, HAS_NOISE, CHANNELS_LAST, CP, ALIGNED, ROWS)
    # partial[b, q] lives at the program's own flat index
    tl.store(partial_ptr + tl.program_id(0), w * tl.sum(diff * diff))
    if SAVE_G:  # the unscaled gradient: the backward becomes a scale, with no second noise pass
        gscale = w * 2.0 * c_out
        tl.store(G_ptr + addr, (gscale * diff).to(G_ptr.dtype.element_ty), mask=mask)


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


@triton.jit
def _scale_grad_kernel(grad_ptr, G_ptr, dF_ptr, P, HW, C, NPROG,
                       CHANNELS_LAST: tl.constexpr, CP: tl.constexpr, ROWS: tl.constexpr):
    b, q, mask, addr, j = tc.tile(P, HW, C, NPROG, CHANNELS_LAST, CP, ROWS)
    g = tl.load(grad_ptr + b).to(tl.float32)
    G = tl.load(G_ptr + addr, mask=mask, other=0.0).to(tl.float32)
    tl.store(dF_ptr + addr, (G * g).to(dF_ptr.dtype.element_ty), mask=mask)


def _launch_args(F, y, sigma, rng, noise, clamp, params):
    L = tc.Launch(F, rng)
    sd, _, _, smin, smax, m, fbm, fbd = params
    tensors = (F, y, sigma, 1 if sigma.numel() > 1 else 0, rng, noise if noise is not None else F, clamp)
    scalars = (*L.geometry(), L.idx_per_sample, L.rng_stride, sd, smin, smax, m, fbm, fbd)
    return L, tensors, scalars


@triton_op("fdm_fast_triton::loss_fwd", mutates_args=())
def loss_fwd(F: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor, rng: torch.Tensor, noise: Optional[torch.Tensor],
             clamp: torch.Tensor, kind: int, fdm: bool, params: List[float],
             save_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loss [B] (float32) and, with ``save_grad``, G = 2 w c_out (D - y) (F's dtype and layout;
    an empty tensor otherwise)."""
    L, tensors, scalars = _launch_args(F, y, sigma, rng, noise, clamp, params)
    partial = tc.empty((L.B, L.nprog), torch.float32, F.device)
    G = tc.empty_like_layout(F, F.dtype) if save_grad else F.new_empty((0,))
    tc.traceable(_loss_fwd_kernel)[L.grid](*tensors, partial, G, *scalars, KIND=kind, FDM=fdm,
                                           HAS_NOISE=noise is not None, SAVE_G=save_grad, ALIGNED=L.aligned,
                                           **L.consts())
    return partial.sum(dim=1), G


@triton_op("fdm_fast_triton::loss_bwd", mutates_args=())
def loss_bwd(grad: torch.Tensor, F: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor, rng: torch.Tensor,
             noise: Optional[torch.Tensor], clamp: torch.Tensor, kind: int, fdm: bool,
             params: List[float]) -> torch.Tensor:
    L, tensors, scalars = _launch_args(F, y, sigma, rng, noise, clamp, params)
    dF = tc.empty_like_layout(F, F.dtype)
    tc.traceable(_loss_bwd_kernel)[L.grid](grad.float().contiguous(), *tensors, dF, *scalars, KIND=kind, FDM=fdm,
                                           HAS_NOISE=noise is not None, ALIGNED=L.aligned, **L.consts())
    return dF


@triton_op("fdm_fast_triton::scale_grad", mutates_args=())
def scale_grad(G: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """dF = grad[b] * G (G from ``loss_fwd(..., save_grad=True)``), in G's dtype and layout."""
    L = tc.Launch(G, None)
    dF = tc.empty_like_layout(G, G.dtype)
    tc.traceable(_scale_grad_kernel)[L.grid](grad.float().contiguous(), G, dF, *L.geometry(), **L.consts())
    return dF


def _setup_context(ctx, inputs, output):
    F, y, sigma, rng, noise, clamp, kind, fdm, params, save_grad = inputs
    ctx.saved_grad = save_grad
    if save_grad:
        ctx.save_for_backward(output[1])
    else:
        ctx.save_for_backward(F, y, sigma, rng, noise, clamp)
        ctx.spec = (kind, fdm, params)


def _backward(ctx, grad, _grad_G):
    if ctx.saved_grad:
        (G,) = ctx.saved_tensors
        dF = scale_grad(G, grad)
    else:
        F, y, sigma, rng, noise, clamp = ctx.saved_tensors
        dF = loss_bwd(grad, F, y, sigma, rng, noise, clamp, *ctx.spec)
    return dF, None, None, None, None, None, None, None, None, None


loss_fwd.register_autograd(_backward, setup_context=_setup_context)
