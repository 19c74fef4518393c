"""The compiled backends ``cpu`` and ``cuda``: loads ``fdm_fast._C`` (which registers the ops as
``torch.ops.fdm_fast_ext.*``, with CPU and CUDA kernels), registers their fake kernels (shapes and
layouts only, over symbolic sizes: torch.compile with dynamic shapes and meta tensors use them), and
wraps the loss in its autograd.

Importing this module fails with ImportError when the extension was not built; ``_backends`` turns
that into a clear "not available" reason.
"""

from __future__ import annotations

import os

import torch

CPU_ISAS = ("avx512", "avx2", "base")
_cap = os.environ.get("FDM_FAST_CPU_ISA", "")
if _cap not in ("",) + CPU_ISAS:  # read by the library as it loads, so checked before it does
    raise ValueError(f"FDM_FAST_CPU_ISA: expected one of {', '.join(CPU_ISAS)} (or unset), got {_cap!r}")

from .. import _C  # noqa: E402  (loading the library registers torch.ops.fdm_fast_ext)

OPS = torch.ops.fdm_fast_ext


# ------------------------------------------------------------------------------------------------
# Fake kernels: outputs in the layout of the op's main input, as the real kernels allocate them.


def _like(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    cl = ref.dim() == 4 and not ref.is_contiguous() and ref.is_contiguous(memory_format=torch.channels_last)
    return torch.empty_like(ref, dtype=dtype, memory_format=torch.channels_last if cl else torch.contiguous_format)


def _none(ref: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return ref.new_empty((0,), dtype=dtype)


@torch.library.register_fake("fdm_fast_ext::perturb")
def _perturb_fake(y, sigma, rng, noise, kind, fdm, params, out_dtype, write_x):
    return _like(y, out_dtype), (_like(y, torch.float32) if write_x else _none(y))


@torch.library.register_fake("fdm_fast_ext::randn")
def _randn_fake(shape, rng):
    return rng.new_empty(shape, dtype=torch.float32)


@torch.library.register_fake("fdm_fast_ext::loss_fwd")
def _loss_fwd_fake(F, y, sigma, rng, noise, clamp, kind, fdm, params, save_grad):
    return F.new_empty((F.shape[0],), dtype=torch.float32), (_like(F, F.dtype) if save_grad else _none(F, F.dtype))


@torch.library.register_fake("fdm_fast_ext::scale_grad")
def _scale_grad_fake(G, grad):
    return _like(G, G.dtype)


@torch.library.register_fake("fdm_fast_ext::loss_bwd")
def _loss_bwd_fake(grad, F, y, sigma, rng, noise, clamp, kind, fdm, params):
    return _like(F, F.dtype)


@torch.library.register_fake("fdm_fast_ext::churn")
def _churn_fake(x, t_cur, t_hat, rng, noise, S_noise, kind, fdm, params, net_dtype):
    return _like(x, torch.float32), _like(x, net_dtype)


@torch.library.register_fake("fdm_fast_ext::euler_step")
def _euler_fake(x, F, t_cur, t_next, kind, fdm, params, net_dtype, write_x, write_d):
    return (_like(x, torch.float32) if write_x else _none(x), _like(x, torch.float32) if write_d else _none(x),
            _like(x, net_dtype))


@torch.library.register_fake("fdm_fast_ext::heun_step")
def _heun_fake(x, d, F, t_cur, t_next, t_hat_next, rng, noise, S_noise, kind, fdm, params, net_dtype):
    return _like(x, torch.float32), _like(x, net_dtype)


@torch.library.register_fake("fdm_fast_ext::multistep")
def _multistep_fake(x, F, G, history, coef, rng, noise, draws, net_dtype, write_net, write_keep):
    return (_like(x, torch.float32), _like(x, net_dtype) if write_net else _none(x),
            _like(x, torch.float32) if write_keep else _none(x))


def has_cpu() -> bool:
    return bool(_C.has_cpu())


def has_cuda() -> bool:
    return bool(_C.has_cuda())


def cpu_isa() -> str:
    """The build of the CPU kernels in use: the best of avx512 / avx2 / base this CPU runs, capped by
    FDM_FAST_CPU_ISA (csrc/cpu/ops_cpu.cpp, Isa). A library built by Clang (or with -DFDM_NO_ISA_VARIANTS)
    has the baseline build of every task only; there this names only the Philox stage of the noise (the
    hand-written AVX-512 one, or the portable one)."""
    return str(_C.cpu_isa())


class DenoiseLoss(torch.autograd.Function):
    """The compiled loss with its backward. With ``save_grad`` the forward also writes the unscaled
    gradient G = 2 w c_out (D - y), so the backward is one per-sample scale (scale_grad) instead of a
    second noise pass; without it (no gradient expected) the backward regenerates the noise.

    A plain autograd.Function (not torch.library.register_autograd): 60 us less Python per call on
    the CPU here, and dynamo traces it all the same.
    """

    @staticmethod
    def forward(ctx, F, y, sigma, rng, noise, clamp, kind, fdm, params, save_grad):
        per_sample, G = OPS.loss_fwd(F, y, sigma, rng, noise, clamp, kind, fdm, params, save_grad)
        ctx.saved_grad = save_grad
        if save_grad:
            ctx.save_for_backward(G)
        else:
            ctx.save_for_backward(F, y, sigma, rng, noise, clamp)
            ctx.spec = (kind, fdm, params)
        return per_sample

    @staticmethod
    def backward(ctx, grad):
        if ctx.saved_grad:
            (G,) = ctx.saved_tensors
            dF = OPS.scale_grad(G, grad)
        else:
            F, y, sigma, rng, noise, clamp = ctx.saved_tensors
            dF = OPS.loss_bwd(grad, F, y, sigma, rng, noise, clamp, *ctx.spec)
        return dF, None, None, None, None, None, None, None, None, None


def call(name: str, *args):
    if name == "loss_fwd":
        return DenoiseLoss.apply(*args)
    return getattr(OPS, name)(*args)
