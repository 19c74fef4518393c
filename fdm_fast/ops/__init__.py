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

import math
from typing import Optional, Sequence

import torch

from ..schedules import Precond
from . import _validate as V
from . import reference
from ._backends import BACKENDS, available_backends, loaded_extension, select, triton_module
from ._validate import canonical_device, set_value_checks, value_checks

__all__ = ["perturb", "denoise_loss", "churn", "euler_step", "heun_step", "multistep", "randn", "available_backends",
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
    # The fused backends write the unscaled gradient in the forward when one will be needed, so the
    # backward is a per-sample scale instead of a second noise pass.
    save = torch.is_grad_enabled() and F.requires_grad
    if be == "torch":
        per_sample = reference.denoise_loss(F, y, s, p, rng, noise, c)
    elif be == "triton":
        per_sample, _ = triton_module("loss").loss_fwd(F, y, s, rng, noise, c, *_spec(p), save)
    else:
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
    both_numbers = not isinstance(t_hat, torch.Tensor) and not isinstance(t_cur, torch.Tensor)
    quiet = t_hat is t_cur or S_noise == 0 or (both_numbers and t_hat == t_cur)
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


MAX_HISTORY = 4


def _plain_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _coef_column(name, v, B, device, dt):
    """A coefficient as a [R] column (R = 1 for a number or a 1-element tensor, else B)."""
    if isinstance(v, torch.Tensor):
        if v.dim() > 1 or v.numel() not in (1, B):
            raise ValueError(f"{name}: expected a number or a tensor of one value per sample ({B}), "
                             f"got shape {tuple(v.shape)}")
        if v.device != device:
            raise ValueError(f"{name}: expected a tensor on {device} (the state's device), got {v.device}")
        return v.reshape(-1).to(dt)
    if not _plain_number(v):
        raise ValueError(f"{name}: expected a finite number or a per-sample tensor, got {v!r}")
    return torch.full((1,), float(v), dtype=dt, device=device)


def multistep(x: torch.Tensor, F: Optional[torch.Tensor] = None, *, c_skip=0.0, c_out=0.0, a=1.0, b=0.0,
              history: Sequence[torch.Tensor] = (), h: Sequence = (), G: Optional[torch.Tensor] = None,
              w_G=0.0, noise_scale=0.0, seed=0, offset=0, noise: Optional[torch.Tensor] = None,
              c_in_next=None, keep=None, net_dtype: torch.dtype = torch.float32, backend: Optional[str] = None):
    """The one step every solver of ``fdm_fast.solvers`` takes: a linear combination, fused with the
    denoiser output and the next network input (docs/design.md 2.1)::

        D      = c_skip x + c_out F + w_G G           the denoised estimate at (x, sigma); with
                                                     guidance F and G are the two network outputs
        x_next = a x + b D + sum_k h[k] history[k] + noise_scale n
        net_in = c_in_next x_next                    (when c_in_next is given)
        kept   = p x + q D                           (when keep = (p, q): e.g. D itself, (0, 1), or the
                                                     slope (x - D) / sigma, (1/sigma, -1/sigma))

    x and history are float32 sampler state (at most 4 stored tensors), F and G network outputs of
    any network dtype, the layout of x for all. Every coefficient is a number or a per-sample [B]
    tensor. n is the contract noise at (seed, offset), drawn only where noise_scale is not zero (or
    ``noise`` when given). Returns (x_next, net_in or None, kept or None). Every backend.
    """
    V.tensor("x", x)
    history = list(history)
    _no_grad_inputs("multistep", x=x, F=F, G=G, noise=noise, **{f"history[{k}]": t for k, t in enumerate(history)})
    be = select(x.device, backend, op="multistep")
    _state("x", x, be)
    if F is not None:
        V.tensor("F", F, dtypes=V.net_dtypes(be), like=x, like_name="x")
    if G is not None:
        if F is None:
            raise ValueError("G: a guiding network output needs F (the main one)")
        V.tensor("G", G, dtypes=V.net_dtypes(be), like=x, like_name="x")
    if len(history) > MAX_HISTORY:
        raise ValueError(f"history: expected at most {MAX_HISTORY} stored tensors, got {len(history)}")
    if len(h) != len(history):
        raise ValueError(f"h: expected one coefficient per history tensor ({len(history)}), got {len(h)}")
    for k, t in enumerate(history):
        _state(f"history[{k}]", t, be, like=x, like_name="x")
    _check_noise(noise, x, "x", be)
    x, F, G, noise, *history = V.layout(x, F, G, noise, *history)
    B, device = x.shape[0], x.device
    dt = torch.float64 if be == "torch" and x.dtype == torch.float64 else torch.float32
    if keep is not None and (not isinstance(keep, (tuple, list)) or len(keep) != 2):
        raise ValueError(f"keep: expected (p, q) for kept = p x + q D, got {keep!r}")
    if F is None and keep is not None and not (isinstance(keep[1], (int, float)) and keep[1] == 0):
        raise ValueError("keep: q D needs F (no denoised estimate without a network output)")
    p, q = keep if keep is not None else (0.0, 0.0)
    names = ["c_skip", "c_out", "w_G", "a", "b", *[f"h[{k}]" for k in range(len(history))], "noise_scale",
             "c_in_next", "keep[0]", "keep[1]"]
    vals = [c_skip, c_out, w_G, a, b, *h, noise_scale, 0.0 if c_in_next is None else c_in_next, p, q]
    if device.type == "cpu" and all(_plain_number(v) for v in vals):
        # all numbers on the CPU: the table in one go (30 us less per call than a fill per column)
        coef = torch.tensor([[float(v) for v in vals]], dtype=dt)
    else:  # a fill per number (no host-to-device copy on an accelerator), per-sample tensors as they are
        cols = [_coef_column(n, v, B, device, dt) for n, v in zip(names, vals)]
        R = max(c.numel() for c in cols)
        coef = torch.stack([c.expand(R) for c in cols], dim=1).contiguous()
    draws = noise is not None or not (isinstance(noise_scale, (int, float)) and noise_scale == 0)
    rng = V.rng(seed, offset, B, device) if draws and noise is None else V.no_rng(seed, offset, device)
    nd = V.out_dtype("net_dtype", net_dtype, be)
    wn, wk = c_in_next is not None, keep is not None
    if be == "torch":
        x_next, net_in, kept = reference.multistep(x, F, G, history, coef, rng if draws and noise is None else None,
                                                   noise if draws else None, nd, wn, wk)
    elif be == "triton":
        x_next, net_in, kept = triton_module("sampler").multistep(x, F, G, history, coef, rng, noise, draws, nd,
                                                                  wn, wk)
    else:
        x_next, net_in, kept = _ext_call(be, "multistep", x, F, G, history, coef, rng, noise, draws, nd, wn, wk)
    return x_next, (net_in if wn else None), (kept if wk else None)


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
