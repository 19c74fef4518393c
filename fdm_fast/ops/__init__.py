"""fdm_fast.ops: the fused per-element work of FDM training and sampling (docs/design.md 2.1).

Every op takes the raw UNet output / clean data and a preconditioning, computes the coefficients
``c_skip, c_out, c_in, lambda`` in-kernel from the per-sample ``sigma``, and, where noise is needed,
regenerates it from ``(seed, offset)`` under the noise contract (or reads an explicit ``noise``).

    from fdm_fast import ops
    net_in = ops.perturb(y, sigma, "fdm_edm", seed=step)                 # c_in * (y + sigma n)
    F = unet(net_in, c_noise)
    loss = ops.denoise_loss(F, y, sigma, "fdm_edm", seed=step, clamp=c)  # backward: one pass

Backends (``backend=``, or ``$FDM_FAST_BACKEND``): ``torch`` (reference, any device), ``triton``
(CUDA; CPU only under ``TRITON_INTERPRET=1``), ``cuda`` and ``cpu`` (compiled ``fdm_fast._C``).
``available_backends()`` lists what this machine has.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..schedules import Precond
from . import _validate as V
from . import reference
from ._backends import BACKENDS, available_backends, loaded_extension, select, triton_module
from ._validate import canonical_device, set_value_checks, value_checks

__all__ = ["perturb", "denoise_loss", "churn", "euler_step", "heun_step", "randn", "available_backends",
           "select_backend", "set_value_checks", "value_checks", "canonical_device", "BACKENDS"]


def select_backend(device="cpu", backend: Optional[str] = None) -> str:
    """The backend an op on ``device`` would run on (after ``backend=`` and the environment)."""
    return select(torch.device(device), backend)


def _spec(p: Precond):
    kind, fdm, params = p.kernel_spec()
    return kind, fdm, list(params)


def _check_noise(noise, like, like_name, be) -> None:
    """An explicit ``noise`` tensor: a net-facing dtype, the shape and device of ``like``."""
    if noise is not None:
        V.tensor("noise", noise, dtypes=V.net_dtypes(be), like=like, like_name=like_name)


def _ext_call(backend: str, name: str, *args):
    """Run a compiled op (``cpu`` / ``cuda`` backends; the device picks the kernel)."""
    return loaded_extension().call(name, *args)


# ----------------------------------------------------------------------------------------------
# Training.


def perturb(y: torch.Tensor, sigma, precond, *, seed=0, offset=0, noise: Optional[torch.Tensor] = None,
            out_dtype: Optional[torch.dtype] = None, return_x: bool = False, backend: Optional[str] = None):
    """The UNet's training input ``c_in(sigma) * (y + sigma * n)`` in one pass.

    y: clean data [B, ...] (fp32/bf16/fp16); sigma: float or per-sample [B]; precond: name or Precond.
    n comes from the noise contract at (seed, offset) unless ``noise`` is given; use the same
    seed/offset in ``denoise_loss``. Returns net_in (dtype ``out_dtype``, default y's; layout y's), or
    (net_in, x) with the float32 noisy sample x = y + sigma n when ``return_x``.
    """
    p = V.precond(precond)
    V.tensor("y", y)
    be = select(y.device, backend)
    V.tensor("y", y, dtypes=V.net_dtypes(be))
    _check_noise(noise, y, "y", be)
    y, noise = V.layout(y, noise)
    B = y.shape[0]
    s = V.sigma("sigma", sigma, B, y.device, dtype=torch.float64 if be == "torch" and y.dtype == torch.float64
                else torch.float32)
    rng = V.rng(seed, offset, B, y.device) if noise is None else V.no_rng(seed, offset, y.device)
    od = V.out_dtype("out_dtype", out_dtype if out_dtype is not None else y.dtype, be)
    if be == "torch":
        net_in, x = reference.perturb(y, s, p, rng, noise, od, return_x)
    else:
        def run(y_):
            if be == "triton":
                return triton_module("perturb").perturb(y_, s, rng, noise, *_spec(p), od, return_x)
            return _ext_call(be, "perturb", y_, s, rng, noise, *_spec(p), od, return_x)

        if torch.is_grad_enabled() and y.requires_grad:  # the same gradient as the torch backend
            net_in, x = _PerturbGrad.apply(y, p.c_in(s), run, return_x)
        else:
            net_in, x = run(y)
    return (net_in, x) if return_x else net_in


class _PerturbGrad(torch.autograd.Function):
    """perturb's gradient with respect to y for the fused backends: d net_in / dy = c_in(sigma),
    d x / dy = 1 (sigma, the noise and the coefficients take no gradient)."""

    @staticmethod
    def forward(ctx, y, c_in, run, return_x):
        ctx.save_for_backward(c_in)
        ctx.y_dtype, ctx.return_x = y.dtype, return_x
        net_in, x = run(y.detach())
        if not return_x:
            ctx.mark_non_differentiable(x)
        return net_in, x

    @staticmethod
    def backward(ctx, g_net, g_x):
        (c_in,) = ctx.saved_tensors
        g = g_net.float() * c_in.float().reshape(-1, *([1] * (g_net.dim() - 1)))
        if ctx.return_x and g_x is not None:
            g = g + g_x
        return g.to(ctx.y_dtype), None, None, None


def denoise_loss(F: torch.Tensor, y: torch.Tensor, sigma, precond, *, seed=0, offset=0,
                 noise: Optional[torch.Tensor] = None, clamp=None, reduction: str = "mean",
                 backend: Optional[str] = None) -> torch.Tensor:
    """EDM's weighted denoising loss from the raw UNet output, with a one-pass fused backward.

    Per sample: ``min(lambda(sigma), clamp) * sum_j (D_j - y_j)^2`` with ``D = c_skip x + c_out F`` and
    ``x = y + sigma n`` (n regenerated from (seed, offset), as in ``perturb``). ``reduction``: ``"mean"``
    over the batch (EDM's ``loss.sum() / batch``), ``"sum"``, or ``"none"`` ([B], float32). ``clamp`` is the
    FDM warm-up cap (``schedules.warmup_clamp``; a float or a one-element tensor), None for none.
    Differentiable with respect to F only.
    """
    p = V.precond(precond)
    V.tensor("F", F)
    be = select(F.device, backend)
    V.tensor("F", F, dtypes=V.net_dtypes(be))
    V.tensor("y", y, dtypes=V.net_dtypes(be), like=F, like_name="F")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction: expected 'mean', 'sum' or 'none', got {reduction!r}")
    _check_noise(noise, F, "F", be)
    F, y, noise = V.layout(F, y, noise)
    B = F.shape[0]
    sdt = torch.float64 if be == "torch" and torch.float64 in (F.dtype, y.dtype) else torch.float32
    s = V.sigma("sigma", sigma, B, F.device, dtype=sdt)
    rng = V.rng(seed, offset, B, F.device) if noise is None else V.no_rng(seed, offset, F.device)
    c = V.clamp(clamp, F.device, dtype=sdt)
    if be == "torch":
        per_sample = reference.denoise_loss(F, y, s, p, rng, noise, c)
    elif be == "triton":
        per_sample = triton_module("loss").loss_fwd(F, y, s, rng, noise, c, *_spec(p))
    else:
        # The compiled backends write the unscaled gradient in the forward when one will be needed,
        # so the backward is a per-sample scale instead of a second noise pass.
        save = torch.is_grad_enabled() and F.requires_grad
        per_sample = _ext_call(be, "loss_fwd", F, y, s, rng, noise, c, *_spec(p), save)
    if reduction == "mean":
        return per_sample.mean()
    return per_sample.sum() if reduction == "sum" else per_sample


# ----------------------------------------------------------------------------------------------
# Sampling (EDM Heun / Euler, docs/design.md 1.3).


def _state(name, t, be, like=None, like_name=""):
    return V.tensor(name, t, dtypes=V.state_dtypes(be), like=like, like_name=like_name)


def _no_grad_inputs(op, **tensors):
    """The sampler step ops are not differentiable, on any backend: say so instead of a silent None."""
    if torch.is_grad_enabled():
        for name, t in tensors.items():
            if isinstance(t, torch.Tensor) and t.requires_grad:
                raise ValueError(f"{op}: {name} requires grad, but the sampler step ops are not differentiable "
                                 "(run sampling under torch.no_grad(), or detach the inputs)")


def _t_dtype(be, *ts):
    return torch.float64 if be == "torch" and any(t.dtype == torch.float64 for t in ts) else torch.float32


def churn(x: torch.Tensor, t_cur, t_hat, precond, *, seed=0, offset=0, noise: Optional[torch.Tensor] = None,
          S_noise: float = 1.0, net_dtype: torch.dtype = torch.float32, backend: Optional[str] = None):
    """Stochastic churn: ``x_hat = x + sqrt(t_hat^2 - t_cur^2) S_noise n``; returns (x_hat, c_in(t_hat) x_hat).

    With ``t_hat`` the same number (or the same tensor object) as ``t_cur``, or ``S_noise == 0``, no
    noise is drawn at all: it only forms the net input. Samples whose noise scale is zero skip the
    noise in every backend. x is float32 sampler state.
    """
    p = V.precond(precond)
    V.tensor("x", x)
    _no_grad_inputs("churn", x=x, t_cur=t_cur, t_hat=t_hat, noise=noise)
    be = select(x.device, backend)
    _state("x", x, be)
    _check_noise(noise, x, "x", be)
    x, noise = V.layout(x, noise)
    B, tdt = x.shape[0], _t_dtype(be, x)
    tc = V.sigma("t_cur", t_cur, B, x.device, dtype=tdt)
    _scalar("S_noise", S_noise)
    quiet = t_hat is t_cur or S_noise == 0 or (not isinstance(t_hat, torch.Tensor) and not isinstance(t_cur, torch.Tensor)
                                               and t_hat == t_cur)
    if quiet:
        if isinstance(t_hat, torch.Tensor):  # still checked, never read
            V.sigma("t_hat", t_hat, B, x.device, dtype=tdt)
        th, rng, noise = None, V.no_rng(seed, offset, x.device), None
    else:
        th = V.sigma("t_hat", t_hat, B, x.device, dtype=tdt)
        if V._checking(tc) and bool((th < tc).any()):
            raise ValueError("t_hat: expected t_hat >= t_cur for every sample (churn only adds noise)")
        rng = V.rng(seed, offset, B, x.device) if noise is None else V.no_rng(seed, offset, x.device)
    nd = V.out_dtype("net_dtype", net_dtype, be)
    if be == "torch":
        return reference.churn(x, tc, th, p, rng, noise, S_noise, nd)
    if be == "triton":
        return triton_module("sampler").churn(x, tc, th, rng, noise, float(S_noise), *_spec(p), nd)
    # the compiled kernels skip the noise of every sample whose scale is zero (t_hat = t_cur)
    return _ext_call(be, "churn", x, tc, tc if th is None else th, rng, noise, float(S_noise), *_spec(p), nd)


def euler_step(x: torch.Tensor, F: torch.Tensor, t_cur, t_next, precond, *,
               net_dtype: torch.dtype = torch.float32, return_x: bool = True, return_d: bool = True,
               backend: Optional[str] = None):
    """One Euler step from the raw UNet output F at (x, t_cur) to t_next (t_next may be 0).

    Returns (x_next, d, net_in) with d = (x - D) / t_cur the slope (kept for Heun's correction)
    and net_in = c_in(t_next) * x_next, the next network input. ``return_x=False`` / ``return_d=False``
    skip writing an output the caller does not use (Heun needs d, not x_next; Euler the reverse):
    None comes back in its place.
    """
    p = V.precond(precond)
    V.tensor("x", x)
    _no_grad_inputs("euler_step", x=x, F=F, t_cur=t_cur, t_next=t_next)
    be = select(x.device, backend)
    _state("x", x, be)
    V.tensor("F", F, dtypes=V.net_dtypes(be), like=x, like_name="x")
    x, F = V.layout(x, F)
    B, tdt = x.shape[0], _t_dtype(be, x, F)
    tc = V.sigma("t_cur", t_cur, B, x.device, dtype=tdt)
    tn = V.sigma("t_next", t_next, B, x.device, dtype=tdt, allow_zero=True)
    nd = V.out_dtype("net_dtype", net_dtype, be)
    wx, wd = bool(return_x), bool(return_d)
    if be == "torch":
        x_next, d, net_in = reference.euler_step(x, F, tc, tn, p, nd)
    elif be == "triton":
        x_next, d, net_in = triton_module("sampler").euler_step(x, F, tc, tn, *_spec(p), nd, wx, wd)
    else:
        x_next, d, net_in = _ext_call(be, "euler_step", x, F, tc, tn, *_spec(p), nd, wx, wd)
    return (x_next if wx else None), (d if wd else None), net_in


def heun_step(x: torch.Tensor, d: torch.Tensor, F: torch.Tensor, t_cur, t_next, precond, *, t_hat_next=None,
              seed=0, offset=0, noise: Optional[torch.Tensor] = None, S_noise: float = 1.0,
              net_dtype: torch.dtype = torch.float32, backend: Optional[str] = None):
    """Heun's second-order correction of the step t_cur -> t_next (t_next > 0).

    x and d are the step's start and Euler slope (from ``euler_step``), F the UNet output at the
    Euler point. With ``t_hat_next`` the next step's churn is fused in. Returns (x_next, net_in).
    """
    p = V.precond(precond)
    V.tensor("x", x)
    _no_grad_inputs("heun_step", x=x, d=d, F=F, t_cur=t_cur, t_next=t_next, t_hat_next=t_hat_next, noise=noise)
    be = select(x.device, backend)
    _state("x", x, be)
    _state("d", d, be, like=x, like_name="x")
    V.tensor("F", F, dtypes=V.net_dtypes(be), like=x, like_name="x")
    _check_noise(noise, x, "x", be)
    x, d, F, noise = V.layout(x, d, F, noise)
    B, tdt = x.shape[0], _t_dtype(be, x, d, F)
    tc = V.sigma("t_cur", t_cur, B, x.device, dtype=tdt)
    tn = V.sigma("t_next", t_next, B, x.device, dtype=tdt)
    th = None
    if t_hat_next is not None:
        th = V.sigma("t_hat_next", t_hat_next, B, x.device, dtype=tdt)
        if V._checking(tn) and bool((th < tn).any()):
            raise ValueError("t_hat_next: expected t_hat_next >= t_next for every sample")
    _scalar("S_noise", S_noise)
    if th is None or noise is not None:  # no noise drawn: no rng work at all
        rng = V.no_rng(seed, offset, x.device)
        noise = noise if th is not None else None
    else:
        rng = V.rng(seed, offset, B, x.device)
    nd = V.out_dtype("net_dtype", net_dtype, be)
    if be == "torch":
        return reference.heun_step(x, d, F, tc, tn, p, th, rng, noise, S_noise, nd)
    if be == "triton":
        return triton_module("sampler").heun_step(x, d, F, tc, tn, th, rng, noise, float(S_noise), *_spec(p), nd)
    return _ext_call(be, "heun_step", x, d, F, tc, tn, th, rng, noise, float(S_noise), *_spec(p), nd)


def randn(shape: Sequence[int], *, seed=0, offset=0, device="cpu", backend: Optional[str] = None) -> torch.Tensor:
    """float32 normals of the noise contract: the noise every op draws for the same (seed, offset).

    ``seed`` may be a per-sample int64 tensor [shape[0]]; each sample is then numbered from 0.
    """
    shape = [int(s) for s in shape]
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"shape: expected a non-empty shape of positive sizes, got {shape}")
    device = V.canonical_device(device)
    be = select(device, backend)
    rng = V.rng(seed, offset, shape[0], device)
    if be == "torch":
        return reference.randn(shape, rng, device)
    if be == "triton":
        return triton_module("perturb").randn(shape, rng)
    return _ext_call(be, "randn", shape, rng)


def _scalar(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v != v or v == float("inf"):
        raise ValueError(f"{name}: expected a finite number >= 0, got {v!r}")
