"""Triton: EDM sampler steps (docs/design.md 1.3) fused with the denoiser output and the next net input.

churn:  x_hat = x + sqrt(t_hat^2 - t^2) S_noise n;         net_in = c_in(t_hat) x_hat
euler:  D = c_skip(t) x + c_out(t) F;  d = (x - D) / t;     x_next = x + (t_next - t) d
        net_in = c_in(t_next) x_next
heun:   x_eul = x + h d,  h = t_next - t
        d2 = (x_eul - c_skip(t_next) x_eul - c_out(t_next) F) / t_next
        x_next = x + h (d + d2) / 2  [+ sqrt(t_hat'^2 - t_next^2) S_noise n  when churning next]
        net_in = c_in(t_out) x_next

Sampler state (x, d) is float32; F and net_in are in the network's dtype. Per-sample noise levels
are tensors of shape [B] or [1]; a step reads each element a handful of times instead of dozens.
"""

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from . import triton_common as tc


@triton.jit
def _churn_kernel(x_ptr, t_ptr, th_ptr, T_STRIDE, rng_ptr, noise_ptr, xo_ptr, net_ptr, S_noise,
                  P, HW, C, NPROG, IDX_PER_SAMPLE, RNG_STRIDE, sd, smin, smax, m, fbm, fbd,
                  KIND: tl.constexpr, FDM: tl.constexpr, NOISE: tl.constexpr, HAS_NOISE: tl.constexpr,
                  CHANNELS_LAST: tl.constexpr, CP: tl.constexpr, ALIGNED: tl.constexpr, ROWS: tl.constexpr):
    b, q, mask, addr, j = tc.tile(P, HW, C, NPROG, CHANNELS_LAST, CP, ROWS)
    th = tl.load(th_ptr + b * T_STRIDE).to(tl.float32)
    c_in = tc.c_in_only(th, KIND, FDM, sd, smin, smax, m, fbm, fbd)
    x = tl.load(x_ptr + addr, mask=mask, other=0.0).to(tl.float32)
    if NOISE:
        t = tl.load(t_ptr + b * T_STRIDE).to(tl.float32)
        scale = tl.sqrt_rn(tl.maximum(th * th - t * t, 0.0)) * S_noise
        if scale != 0.0:  # no Philox where this sample adds no noise (t_hat == t_cur)
            if HAS_NOISE:
                n = tl.load(noise_ptr + addr, mask=mask, other=0.0).to(tl.float32)
            else:
                n = tc.noise(rng_ptr, b, q, j, HW, IDX_PER_SAMPLE, RNG_STRIDE, CHANNELS_LAST, CP, ROWS, ALIGNED)
            x = x + scale * n
    tl.store(xo_ptr + addr, x, mask=mask)
    tl.store(net_ptr + addr, (c_in * x).to(net_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _euler_kernel(x_ptr, F_ptr, t_ptr, tn_ptr, T_STRIDE, xo_ptr, d_ptr, net_ptr,
                  P, HW, C, NPROG, sd, smin, smax, m, fbm, fbd,
                  KIND: tl.constexpr, FDM: tl.constexpr, WRITE_X: tl.constexpr, WRITE_D: tl.constexpr,
                  CHANNELS_LAST: tl.constexpr, CP: tl.constexpr, ROWS: tl.constexpr):
    b, q, mask, addr, j = tc.tile(P, HW, C, NPROG, CHANNELS_LAST, CP, ROWS)
    t = tl.load(t_ptr + b * T_STRIDE).to(tl.float32)
    tn = tl.load(tn_ptr + b * T_STRIDE).to(tl.float32)
    c_skip, c_out, _, _ = tc.coefficients(t, KIND, FDM, sd, smin, smax, m, fbm, fbd)
    c_in_next = tc.c_in_only(tn, KIND, FDM, sd, smin, smax, m, fbm, fbd)
    x = tl.load(x_ptr + addr, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(F_ptr + addr, mask=mask, other=0.0).to(tl.float32)
    d = (x - (c_skip * x + c_out * f)) / t
    x_next = x + (tn - t) * d
    if WRITE_X:
        tl.store(xo_ptr + addr, x_next, mask=mask)
    if WRITE_D:
        tl.store(d_ptr + addr, d, mask=mask)
    tl.store(net_ptr + addr, (c_in_next * x_next).to(net_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _heun_kernel(x_ptr, d_ptr, F_ptr, t_ptr, tn_ptr, th_ptr, T_STRIDE, rng_ptr, noise_ptr, xo_ptr, net_ptr, S_noise,
                 P, HW, C, NPROG, IDX_PER_SAMPLE, RNG_STRIDE, sd, smin, smax, m, fbm, fbd,
                 KIND: tl.constexpr, FDM: tl.constexpr, CHURN: tl.constexpr, HAS_NOISE: tl.constexpr,
                 CHANNELS_LAST: tl.constexpr, CP: tl.constexpr, ALIGNED: tl.constexpr, ROWS: tl.constexpr):
    b, q, mask, addr, j = tc.tile(P, HW, C, NPROG, CHANNELS_LAST, CP, ROWS)
    t = tl.load(t_ptr + b * T_STRIDE).to(tl.float32)
    tn = tl.load(tn_ptr + b * T_STRIDE).to(tl.float32)
    c_skip, c_out, _, _ = tc.coefficients(tn, KIND, FDM, sd, smin, smax, m, fbm, fbd)
    h = tn - t
    x = tl.load(x_ptr + addr, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(d_ptr + addr, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(F_ptr + addr, mask=mask, other=0.0).to(tl.float32)
    x_eul = x + h * d
    d2 = (x_eul - (c_skip * x_eul + c_out * f)) / tn
    x_next = x + h * (0.5 * d + 0.5 * d2)
    if CHURN:
        t_out = tl.load(th_ptr + b * T_STRIDE).to(tl.float32)
        scale = tl.sqrt_rn(tl.maximum(t_out * t_out - tn * tn, 0.0)) * S_noise
        if scale != 0.0:
            if HAS_NOISE:
                n = tl.load(noise_ptr + addr, mask=mask, other=0.0).to(tl.float32)
            else:
                n = tc.noise(rng_ptr, b, q, j, HW, IDX_PER_SAMPLE, RNG_STRIDE, CHANNELS_LAST, CP, ROWS, ALIGNED)
            x_next = x_next + scale * n
    else:
        t_out = tn
    c_in = tc.c_in_only(t_out, KIND, FDM, sd, smin, smax, m, fbm, fbd)
    tl.store(xo_ptr + addr, x_next, mask=mask)
    tl.store(net_ptr + addr, (c_in * x_next).to(net_ptr.dtype.element_ty), mask=mask)


def _t_stride(*ts):
    return 1 if ts[0].numel() > 1 else 0


def _spec_args(params):
    sd, _, _, smin, smax, m, fbm, fbd = params
    return sd, smin, smax, m, fbm, fbd


@triton_op("fdm_fast_triton::churn", mutates_args=())
def churn(x: torch.Tensor, t_cur: torch.Tensor, t_hat: Optional[torch.Tensor], rng: torch.Tensor,
          noise: Optional[torch.Tensor], S_noise: float, kind: int, fdm: bool, params: List[float],
          net_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """``t_hat=None``: no noise at all (t_hat = t_cur), only the net input; rng is not read."""
    L = tc.Launch(x, rng)
    x_hat = tc.empty_like_layout(x, torch.float32)
    net_in = tc.empty_like_layout(x, net_dtype)
    draws = t_hat is not None
    tc.traceable(_churn_kernel)[L.grid](
        x, t_cur, t_hat if draws else t_cur, _t_stride(t_cur), rng, noise if noise is not None else x, x_hat, net_in,
        S_noise, *L.geometry(), L.idx_per_sample, L.rng_stride, *_spec_args(params),
        KIND=kind, FDM=fdm, NOISE=draws, HAS_NOISE=noise is not None, ALIGNED=L.aligned, **L.consts())
    return x_hat, net_in


@triton_op("fdm_fast_triton::euler_step", mutates_args=())
def euler_step(x: torch.Tensor, F: torch.Tensor, t_cur: torch.Tensor, t_next: torch.Tensor, kind: int, fdm: bool,
               params: List[float], net_dtype: torch.dtype, write_x: bool,
               write_d: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Outputs the caller does not want (``write_x`` / ``write_d`` False) come back empty, unwritten."""
    L = tc.Launch(x)
    x_next = tc.empty_like_layout(x, torch.float32) if write_x else x.new_empty(0)
    d = tc.empty_like_layout(x, torch.float32) if write_d else x.new_empty(0)
    net_in = tc.empty_like_layout(x, net_dtype)
    tc.traceable(_euler_kernel)[L.grid](
        x, F, t_cur, t_next, _t_stride(t_cur), x_next, d, net_in, *L.geometry(), *_spec_args(params),
        KIND=kind, FDM=fdm, WRITE_X=write_x, WRITE_D=write_d, **L.consts())
    return x_next, d, net_in


@triton_op("fdm_fast_triton::heun_step", mutates_args=())
def heun_step(x: torch.Tensor, d: torch.Tensor, F: torch.Tensor, t_cur: torch.Tensor, t_next: torch.Tensor,
              t_hat_next: Optional[torch.Tensor], rng: torch.Tensor, noise: Optional[torch.Tensor], S_noise: float,
              kind: int, fdm: bool, params: List[float],
              net_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    L = tc.Launch(x, rng)
    x_next = tc.empty_like_layout(x, torch.float32)
    net_in = tc.empty_like_layout(x, net_dtype)
    churning = t_hat_next is not None
    tc.traceable(_heun_kernel)[L.grid](
        x, d, F, t_cur, t_next, t_hat_next if churning else t_next, _t_stride(t_cur), rng,
        noise if noise is not None else x, x_next, net_in, S_noise,
        *L.geometry(), L.idx_per_sample, L.rng_stride, *_spec_args(params),
        KIND=kind, FDM=fdm, CHURN=churning, HAS_NOISE=noise is not None, ALIGNED=L.aligned, **L.consts())
    return x_next, net_in


@triton.jit
def _multistep_kernel(x_ptr, F_ptr, G_ptr, H0_ptr, H1_ptr, H2_ptr, H3_ptr, coef_ptr, C_STRIDE, rng_ptr, noise_ptr,
                      xo_ptr, net_ptr, keep_ptr, P, HW, C, NPROG, IDX_PER_SAMPLE, RNG_STRIDE,
                      K: tl.constexpr, HAS_F: tl.constexpr, HAS_G: tl.constexpr, NOISE: tl.constexpr,
                      HAS_NOISE: tl.constexpr, WRITE_NET: tl.constexpr, WRITE_KEEP: tl.constexpr,
                      CHANNELS_LAST: tl.constexpr, CP: tl.constexpr, ALIGNED: tl.constexpr, ROWS: tl.constexpr):
    b, q, mask, addr, j = tc.tile(P, HW, C, NPROG, CHANNELS_LAST, CP, ROWS)
    row = coef_ptr + b * C_STRIDE  # columns: c_skip, w_F, w_G, a, b, h_1..h_K, s, c_in_next, p, q
    x = tl.load(x_ptr + addr, mask=mask, other=0.0).to(tl.float32)
    acc = tl.load(row + 3) * x
    D = x * 0.0
    if HAS_F:
        D = tl.load(row + 0) * x + tl.load(row + 1) * tl.load(F_ptr + addr, mask=mask, other=0.0).to(tl.float32)
        if HAS_G:
            D += tl.load(row + 2) * tl.load(G_ptr + addr, mask=mask, other=0.0).to(tl.float32)
        acc += tl.load(row + 4) * D
    if K >= 1:
        acc += tl.load(row + 5) * tl.load(H0_ptr + addr, mask=mask, other=0.0)
    if K >= 2:
        acc += tl.load(row + 6) * tl.load(H1_ptr + addr, mask=mask, other=0.0)
    if K >= 3:
        acc += tl.load(row + 7) * tl.load(H2_ptr + addr, mask=mask, other=0.0)
    if K >= 4:
        acc += tl.load(row + 8) * tl.load(H3_ptr + addr, mask=mask, other=0.0)
    if NOISE:
        scale = tl.load(row + 5 + K)
        if scale != 0.0:  # no Philox for a sample that adds no noise
            if HAS_NOISE:
                n = tl.load(noise_ptr + addr, mask=mask, other=0.0).to(tl.float32)
            else:
                n = tc.noise(rng_ptr, b, q, j, HW, IDX_PER_SAMPLE, RNG_STRIDE, CHANNELS_LAST, CP, ROWS, ALIGNED)
            acc += scale * n
    tl.store(xo_ptr + addr, acc, mask=mask)
    if WRITE_NET:
        tl.store(net_ptr + addr, (tl.load(row + 6 + K) * acc).to(net_ptr.dtype.element_ty), mask=mask)
    if WRITE_KEEP:
        tl.store(keep_ptr + addr, tl.load(row + 7 + K) * x + tl.load(row + 8 + K) * D, mask=mask)


@triton_op("fdm_fast_triton::multistep", mutates_args=())
def multistep(x: torch.Tensor, F: Optional[torch.Tensor], G: Optional[torch.Tensor], history: List[torch.Tensor],
              coef: torch.Tensor, rng: torch.Tensor, noise: Optional[torch.Tensor], draws: bool,
              net_dtype: torch.dtype, write_net: bool,
              write_keep: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """reference.multistep in one pass; outputs not asked for come back empty, unwritten. ``draws``:
    add the noise column's term (from ``noise`` when given, else from ``rng``)."""
    K = len(history)
    L = tc.Launch(x, rng)
    x_next = tc.empty_like_layout(x, torch.float32)
    net_in = tc.empty_like_layout(x, net_dtype) if write_net else x.new_empty(0)
    keep = tc.empty_like_layout(x, torch.float32) if write_keep else x.new_empty(0)
    hs = list(history) + [x] * (4 - K)
    tc.traceable(_multistep_kernel)[L.grid](
        x, F if F is not None else x, G if G is not None else x, *hs, coef, coef.shape[1] if coef.shape[0] > 1 else 0,
        rng, noise if noise is not None else x, x_next, net_in, keep,
        *L.geometry(), L.idx_per_sample, L.rng_stride,
        K=K, HAS_F=F is not None, HAS_G=G is not None, NOISE=draws, HAS_NOISE=noise is not None,
        WRITE_NET=write_net, WRITE_KEEP=write_keep, ALIGNED=L.aligned, **L.consts())
    return x_next, net_in, keep
