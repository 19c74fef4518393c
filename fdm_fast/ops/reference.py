"""The ``torch`` backend: the executable specification of every fused op (docs/design.md 2.1).

Written op by op in plain PyTorch so that it runs on any device, in any float dtype (float64 for
the tests' reference runs), and traces under ``torch.compile(fullgraph=True)``. The coefficients
come from ``fdm_fast.schedules``; the noise from the noise contract below. Every other backend is
tested against this file.

Noise contract (docs/design.md 2.1). Element ``i`` of the logical (NCHW, row-major) tensor gets component
``i % 4`` of Philox4x32-10 at key ``(seed & 0xffffffff, seed >> 32)`` and counter
``(c & 0xffffffff, c >> 32, 0, 0)``, ``c = offset + i // 4``, turned into normals by Triton's
``randn4x`` recipe (int32 fold, scale 4.6566127342e-10, Box-Muller with ``u1 >= 1e-7``).
With per-sample seeds (``rng`` of shape [B, 2]) the index ``i`` restarts at 0 in every sample, so a
sample's noise depends on its own seed only.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ..schedules import Precond

MASK32 = 0xFFFFFFFF
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85  # key increments (Weyl sequence)
UNIFORM_SCALE = 4.6566127342e-10  # largest scale with INT32_MAX * scale < 1 in float32
TWO_PI = 6.283185307179586
# float32 0-dim host constants: multiplying by them rounds the constant to float32 first, as the
# kernels do; a CPU scalar tensor joins a device op without a copy to the device
_UNIFORM_SCALE32 = torch.tensor(UNIFORM_SCALE, dtype=torch.float32)
_TWO_PI32 = torch.tensor(TWO_PI, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# Philox4x32-10 on int64 tensors holding uint32 values.


def _mulhilo32(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit halves of the 64-bit product of the constant ``a`` and the uint32s in ``b``.

    Split into 16-bit limbs so every partial product fits an int64 without overflow.
    """
    ah, al = a >> 16, a & 0xFFFF
    bh, bl = b >> 16, b & 0xFFFF
    mid = ah * bl + al * bh  # < 2^33
    lo_full = al * bl + ((mid & 0xFFFF) << 16)  # < 2^33
    hi = ah * bh + (mid >> 16) + (lo_full >> 32)
    return hi, lo_full & MASK32


def philox4x32_10(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """Philox4x32 (Salmon et al. 2011) on int64 tensors of uint32 values; returns 4 tensors."""
    for r in range(rounds):
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        if r + 1 < rounds:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def _uniform(x: torch.Tensor) -> torch.Tensor:
    """uint32 -> float32 in [0, 1) exactly as Triton's ``uint_to_uniform_float``."""
    x = torch.where(x >= 2**31, x - 2**32, x)  # bit-cast to int32
    x = torch.where(x < 0, -x - 1, x)  # ~x for negative values
    return x.to(torch.float32) * _UNIFORM_SCALE32


def _box_muller(u1: torch.Tensor, u2: torch.Tensor):
    u1 = torch.clamp_min(u1, 1e-7)
    th = _TWO_PI32 * u2
    r = torch.sqrt(-2.0 * torch.log(u1))
    return r * torch.cos(th), r * torch.sin(th)


def randn4x(seed: torch.Tensor, counter: torch.Tensor):
    """Four float32 normals per counter; ``seed`` and ``counter`` are int64 tensors (broadcast)."""
    seed, counter = torch.broadcast_tensors(seed, counter)
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    c0, c1 = counter & MASK32, (counter >> 32) & MASK32
    zero = torch.zeros_like(c0)
    r0, r1, r2, r3 = philox4x32_10(c0, c1, zero, zero, k0, k1)
    n0, n1 = _box_muller(_uniform(r0), _uniform(r1))
    n2, n3 = _box_muller(_uniform(r2), _uniform(r3))
    return n0, n1, n2, n3


def contract_noise(shape, rng: torch.Tensor) -> torch.Tensor:
    """float32 noise of logical ``shape`` (NCHW, contiguous) under the noise contract.

    ``rng`` is an int64 tensor [S, 2] of (seed, offset) rows: S = 1 numbers the whole tensor,
    S = shape[0] numbers each sample from 0 with its own row.
    """
    shape = tuple(shape)
    numel = math.prod(shape)
    rng = rng.to(torch.int64)
    if rng.shape[0] == 1:
        ncount = (numel + 3) // 4
        counter = rng[0, 1] + torch.arange(ncount, device=rng.device, dtype=torch.int64)
        n = torch.stack(randn4x(rng[0, 0], counter), dim=-1)
        return n.reshape(-1)[:numel].reshape(shape)
    per = numel // shape[0]
    ncount = (per + 3) // 4
    counter = rng[:, 1:2] + torch.arange(ncount, device=rng.device, dtype=torch.int64)[None, :]
    n = torch.stack(randn4x(rng[:, 0:1], counter), dim=-1)
    return n.reshape(shape[0], -1)[:, :per].reshape(shape)


# ----------------------------------------------------------------------------------------------
# The ops. Inputs arrive validated (ops/__init__.py); ``sigma``-like tensors have shape [B] or [1].


def _compute_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _per_sample(v: torch.Tensor, like: torch.Tensor, dtype) -> torch.Tensor:
    return v.to(dtype).reshape(-1, *([1] * (like.dim() - 1)))


def _noise(like: torch.Tensor, rng: Optional[torch.Tensor], noise: Optional[torch.Tensor], dtype) -> torch.Tensor:
    if noise is not None:
        return noise.to(dtype)
    return contract_noise(like.shape, rng).to(device=like.device, dtype=dtype)


def _like(t: torch.Tensor, ref: torch.Tensor, dtype) -> torch.Tensor:
    """``t`` cast to ``dtype`` in the memory format of ``ref`` (outputs keep the input's layout)."""
    fmt = torch.channels_last if ref.dim() == 4 and ref.is_contiguous(memory_format=torch.channels_last) \
        and not ref.is_contiguous() else torch.contiguous_format
    return t.to(dtype).contiguous(memory_format=fmt)


def perturb(y, sigma, precond: Precond, rng=None, noise=None, out_dtype=None, return_x=False):
    """net_in = c_in(sigma) * (y + sigma * n); optionally also x = y + sigma * n (float32 or float64)."""
    dt = _compute_dtype(y, sigma, noise)
    s = _per_sample(sigma, y, dt)
    x = y.to(dt) + s * _noise(y, rng, noise, dt)
    net_in = precond.c_in(s) * x
    net_in = _like(net_in, y, out_dtype or y.dtype)
    return (net_in, _like(x, y, dt)) if return_x else (net_in, None)


def _loss_terms(F, y, sigma, precond, rng, noise, clamp):
    dt = _compute_dtype(F, y, sigma, noise)
    s = _per_sample(sigma, y, dt)
    x = y.to(dt) + s * _noise(y, rng, noise, dt)
    c_out = precond.c_out(s)
    diff = precond.c_skip(s) * x + c_out * F.to(dt) - y.to(dt)  # D - y
    w = precond.loss_weight(s)
    if clamp is not None:
        w = torch.minimum(w, clamp.to(dt).reshape(-1, *([1] * (y.dim() - 1))))
    return diff, w, c_out


def denoise_loss_composite(F, y, sigma, precond: Precond, rng=None, noise=None, clamp=None):
    """Per-sample loss ``min(lambda, clamp) * sum_j (D_j - y_j)^2``, differentiable by plain autograd."""
    diff, w, _ = _loss_terms(F, y, sigma, precond, rng, noise, clamp)
    return (w * diff.square()).flatten(1).sum(1)


def denoise_loss_backward(grad, F, y, sigma, precond: Precond, rng=None, noise=None, clamp=None):
    """dL/dF = grad_b * w_b * 2 (D - y) c_out, in F's dtype and layout."""
    diff, w, c_out = _loss_terms(F, y, sigma, precond, rng, noise, clamp)
    g = _per_sample(grad, y, diff.dtype)
    return _like(g * w * 2 * diff * c_out, F, F.dtype)


class _DenoiseLoss(torch.autograd.Function):
    """The reference loss with its one-pass backward, so the fused backward has a spec too."""

    @staticmethod
    def forward(ctx, F, y, sigma, precond, rng, noise, clamp):
        ctx.precond = precond
        ctx.save_for_backward(F, y, sigma, rng, noise, clamp)
        with torch.no_grad():
            return denoise_loss_composite(F, y, sigma, precond, rng, noise, clamp)

    @staticmethod
    def backward(ctx, grad):
        F, y, sigma, rng, noise, clamp = ctx.saved_tensors
        dF = denoise_loss_backward(grad, F, y, sigma, ctx.precond, rng, noise, clamp)
        return dF, None, None, None, None, None, None


def denoise_loss(F, y, sigma, precond: Precond, rng=None, noise=None, clamp=None):
    return _DenoiseLoss.apply(F, y, sigma, precond, rng, noise, clamp)


def churn(x, t_cur, t_hat, precond: Precond, rng=None, noise=None, S_noise=1.0, net_dtype=torch.float32):
    """x_hat = x + sqrt(t_hat^2 - t_cur^2) * S_noise * n;  net_in = c_in(t_hat) * x_hat.

    ``t_hat=None`` means t_hat = t_cur: no noise is drawn, only the net input is formed."""
    dt = _compute_dtype(x, t_cur, t_hat, noise)
    tc = _per_sample(t_cur, x, dt)
    if t_hat is None:
        return _like(x, x, dt), _like(precond.c_in(tc) * x.to(dt), x, net_dtype)
    th = _per_sample(t_hat, x, dt)
    x_hat = x.to(dt) + (th**2 - tc**2).clamp_min(0).sqrt() * S_noise * _noise(x, rng, noise, dt)
    return _like(x_hat, x, dt), _like(precond.c_in(th) * x_hat, x, net_dtype)


def euler_step(x, F, t_cur, t_next, precond: Precond, net_dtype=torch.float32):
    """D = c_skip x + c_out F at t_cur;  d = (x - D) / t_cur;  x_next = x + (t_next - t_cur) d.

    Returns (x_next, d, c_in(t_next) * x_next).
    """
    dt = _compute_dtype(x, F, t_cur, t_next)
    tc, tn = _per_sample(t_cur, x, dt), _per_sample(t_next, x, dt)
    xd = x.to(dt)
    D = precond.c_skip(tc) * xd + precond.c_out(tc) * F.to(dt)
    d = (xd - D) / tc
    x_next = xd + (tn - tc) * d
    return _like(x_next, x, dt), _like(d, x, dt), _like(precond.c_in(tn) * x_next, x, net_dtype)


def heun_step(x, d, F, t_cur, t_next, precond: Precond, t_hat_next=None, rng=None, noise=None,
              S_noise=1.0, net_dtype=torch.float32):
    """Heun's correction, optionally followed by the next step's churn.

    x_eul = x + (t_next - t_cur) d  (the Euler point, recomputed rather than stored)
    d2 = (x_eul - D(x_eul; t_next)) / t_next;  x_next = x + (t_next - t_cur) (d + d2) / 2
    With ``t_hat_next``: x_next += sqrt(t_hat_next^2 - t_next^2) S_noise n, and the net input is
    taken at t_hat_next. Returns (x_next, c_in(t_out) * x_next).
    """
    dt = _compute_dtype(x, d, F, t_cur, t_next, t_hat_next, noise)
    tc, tn = _per_sample(t_cur, x, dt), _per_sample(t_next, x, dt)
    xd, dd = x.to(dt), d.to(dt)
    h = tn - tc
    x_eul = xd + h * dd
    D2 = precond.c_skip(tn) * x_eul + precond.c_out(tn) * F.to(dt)
    d2 = (x_eul - D2) / tn
    x_next = xd + h * (0.5 * dd + 0.5 * d2)
    t_out = tn
    if t_hat_next is not None:
        t_out = _per_sample(t_hat_next, x, dt)
        x_next = x_next + (t_out**2 - tn**2).clamp_min(0).sqrt() * S_noise * _noise(x, rng, noise, dt)
    return _like(x_next, x, dt), _like(precond.c_in(t_out) * x_next, x, net_dtype)


def randn(shape, rng: torch.Tensor, device=None) -> torch.Tensor:
    return contract_noise(shape, rng).to(device or rng.device)


def multistep(x, F, G, history, coef, rng=None, noise=None, net_dtype=torch.float32, write_net=True,
              write_keep=False):
    """The linear step every solver of fdm_fast.solvers takes (ops.multistep documents the columns):

        D      = c_skip x + w_F F + w_G G                     (F, G: network outputs; G may be absent)
        x_next = a x + b D + sum_k h_k H_k + s n              (H_k: stored float32 tensors; n: contract noise)
        net_in = c_in_next x_next;   keep = p x + q D

    ``coef`` is [R, 9 + K] (R = 1 or B) with columns c_skip, w_F, w_G, a, b, h_1..h_K, s, c_in_next, p, q.
    Returns (x_next, net_in or None, keep or None)."""
    K = len(history)
    dt = _compute_dtype(x, coef, F, *history)
    col = lambda k: coef[:, k].to(dt).reshape(-1, *([1] * (x.dim() - 1)))  # noqa: E731
    xd = x.to(dt)
    acc = col(3) * xd
    D = None
    if F is not None:
        D = col(0) * xd + col(1) * F.to(dt)
        if G is not None:
            D = D + col(2) * G.to(dt)
        acc = acc + col(4) * D
    for k, H in enumerate(history):
        acc = acc + col(5 + k) * H.to(dt)
    if rng is not None or noise is not None:
        acc = acc + col(5 + K) * _noise(x, rng, noise, dt)
    net_in = _like(col(6 + K) * acc, x, net_dtype) if write_net else None
    keep = None
    if write_keep:
        keep = col(7 + K) * xd + (col(8 + K) * D if D is not None else 0)
        keep = _like(keep, x, dt)
    return _like(acc, x, dt), net_in, keep
