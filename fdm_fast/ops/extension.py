"""The compiled backends ``cpu`` and ``cuda``: loads ``fdm_fast._C`` (which registers the ops as
``torch.ops.fdm_fast_ext.*``, with CPU, CUDA and Meta kernels) and wraps the loss in its autograd.

Importing this module fails with ImportError when the extension was not built; ``_backends`` turns
that into a clear "not available" reason.
"""

from __future__ import annotations

import torch

from .. import _C  # noqa: F401  (loading the library registers torch.ops.fdm_fast_ext)

OPS = torch.ops.fdm_fast_ext


def has_cpu() -> bool:
    return bool(_C.has_cpu())


def has_cuda() -> bool:
    return bool(_C.has_cuda())


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
