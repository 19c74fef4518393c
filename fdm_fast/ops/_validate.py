"""Argument checks and the layout rule of the public ops: one place, messages that name the argument.

Shape, dtype and device checks are free and always run. Value checks (sigma finite and positive)
read the tensor, which on a GPU means a device sync: they run unless disabled with
``fdm_fast.ops.set_value_checks(False)`` (or the ``value_checks(False)`` context, or
``FDM_FAST_VALUE_CHECKS=0``), and never while ``torch.compile`` traces or a CUDA graph captures.
``train`` and ``generate`` turn them off on CUDA. Nothing here copies host data to the device: rng
rows are built with fill kernels (a kernel argument, not a copy), so an op never syncs by itself.

Layout rule (``layout``): inputs of any strides are accepted. The first tensor argument decides:
contiguous or channels_last (4-D) it is used as it is, anything else (a slice, an expanded tensor,
permuted strides) is copied once to contiguous; every other tensor argument not already in that
layout is copied into it. Strides of size-1 dims never count ([B, 1, H, W] is both layouts at once).
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Optional, Union

import torch

from ..schedules import Precond, get_precond

NET_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_value_checks = os.environ.get("FDM_FAST_VALUE_CHECKS", "1") not in ("0", "")


def set_value_checks(enabled: bool) -> bool:
    """Turn the data-dependent checks (a device sync on GPUs) on or off; returns the previous setting."""
    global _value_checks
    prev, _value_checks = _value_checks, bool(enabled)
    return prev


@contextlib.contextmanager
def value_checks(enabled: bool):
    """``with value_checks(False): ...`` runs the block without the data-dependent checks."""
    prev = set_value_checks(enabled)
    try:
        yield
    finally:
        set_value_checks(prev)


def _dtype_name(dt) -> str:
    return str(dt).replace("torch.", "")


def tensor(name: str, t, *, dtypes=None, like: Optional[torch.Tensor] = None, like_name: str = "") -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {' or '.join(_dtype_name(d) for d in dtypes)}, "
                        f"got {_dtype_name(t.dtype)}")
    if t.dim() < 1 or t.shape[0] < 1:
        raise ValueError(f"{name}: expected a batch of at least one sample (dim 0), got shape {tuple(t.shape)}")
    if like is not None:
        if t.shape != like.shape:
            raise ValueError(f"{name}: expected shape {tuple(like.shape)} (the shape of {like_name}), "
                             f"got {tuple(t.shape)}")
        if t.device != like.device:
            raise ValueError(f"{name}: expected device {like.device} (the device of {like_name}), got {t.device}")
    return t


def net_dtypes(backend: str):
    """Net-facing dtypes a backend accepts; the torch reference also runs float64 (the tests' spec)."""
    return NET_DTYPES + (torch.float64,) if backend == "torch" else NET_DTYPES


def state_dtypes(backend: str):
    return (torch.float32, torch.float64) if backend == "torch" else (torch.float32,)


def out_dtype(name: str, dt, backend: str) -> torch.dtype:
    if not isinstance(dt, torch.dtype) or dt not in net_dtypes(backend):
        raise TypeError(f"{name}: expected {' or '.join(_dtype_name(d) for d in net_dtypes(backend))}, got {dt!r}")
    return dt


def _checking(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling():
        return False
    if t.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return _value_checks


def sigma(name: str, v, B: int, device: torch.device, *, dtype=torch.float32, allow_zero=False) -> torch.Tensor:
    """A per-sample noise level as a contiguous [B] tensor; float, [], [1] or [B] (or [B,1,..]) accepted."""
    what = "a finite number >= 0" if allow_zero else "a finite number > 0"
    device = canonical_device(device)
    if isinstance(v, bool) or not isinstance(v, (int, float, torch.Tensor)):
        raise TypeError(f"{name}: expected a float or a tensor of per-sample values, got {type(v).__name__}")
    if not isinstance(v, torch.Tensor):
        if not (math.isfinite(v) and (v >= 0 if allow_zero else v > 0)):
            raise ValueError(f"{name}: expected {what}, got {v}")
        return torch.full((B,), float(v), dtype=dtype, device=device)
    if not v.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {_dtype_name(v.dtype)}")
    if v.device != device:
        raise ValueError(f"{name}: expected device {device}, got {v.device}")
    if v.numel() not in (1, B) or (v.dim() > 1 and v.shape[0] != v.numel() and v.numel() != 1):
        raise ValueError(f"{name}: expected one value or one per sample ({B}), got shape {tuple(v.shape)}")
    if _checking(v) and not bool((((v >= 0) if allow_zero else (v > 0)) & (v < math.inf)).all()):  # NaN fails both
        bad = ~torch.isfinite(v) | ((v < 0) if allow_zero else (v <= 0))
        if bool(bad.any()):
            raise ValueError(f"{name}: expected {what} per sample, got {v.flatten()[bad.flatten()][0].item()} "
                             f"at index {int(bad.flatten().nonzero()[0])}")
    v = v.reshape(-1).to(dtype)
    return (v.expand(B) if v.numel() == 1 else v).contiguous()


def precond(p) -> Precond:
    if isinstance(p, Precond):
        return p
    if isinstance(p, str):
        return get_precond(p)
    raise TypeError(f"precond: expected a preconditioning name or a schedules.Precond, got {type(p).__name__}")


def canonical_device(d) -> torch.device:
    """``d`` as a tensor on it reports its device: "cuda" becomes "cuda:<current>", "cpu:0" becomes
    "cpu". Comparing a tensor's device with a user's ``device="cuda"`` is only right in this form."""
    d = torch.device(d)
    if d.type in ("cpu", "meta"):
        return torch.device(d.type)
    if d.index is None:
        return torch.empty(0, device=d).device  # no allocation, no sync
    return d


def _check_seed_offset(seed, offset):
    if isinstance(seed, bool) or not isinstance(seed, (int, torch.Tensor)):
        raise TypeError(f"seed: expected an int or an int64 tensor of per-sample seeds, got {type(seed).__name__}")
    if isinstance(offset, bool) or not isinstance(offset, (int, torch.Tensor)):
        raise TypeError(f"offset: expected an int or an int64 tensor, got {type(offset).__name__}")
    if isinstance(offset, int) and not 0 <= offset < 2**62:
        raise ValueError(f"offset: expected an int in [0, 2^62), got {offset}")
    if isinstance(seed, int) and not 0 <= seed < 2**63:
        raise ValueError(f"seed: expected an int in [0, 2^63), got {seed}")


def rng(seed, offset, B: int, device: torch.device) -> torch.Tensor:
    """(seed, offset) rows as an int64 tensor: [1, 2] for one int seed, [B, 2] for per-sample seeds.

    Built on ``device`` with fill kernels (the ints travel as kernel arguments): no host-to-device
    copy and no sync, so it is safe inside a CUDA graph capture and in the training hot path.
    """
    _check_seed_offset(seed, offset)
    device = canonical_device(device)
    if isinstance(seed, int) and isinstance(offset, int):
        if torch.compiler.is_compiling():  # a constant of the traced graph (inductor inlines a built one)
            return torch.tensor([[seed, offset]], dtype=torch.int64, device=device)
        r = torch.full((1, 2), seed, dtype=torch.int64, device=device)
        r.select(1, 1).fill_(offset)  # the int as the fill's argument (r[:, 1] = offset wraps it in a CPU tensor)
        return r
    for name, v, hi in (("seed", seed, "2^63"), ("offset", offset, "2^62")):
        if isinstance(v, torch.Tensor) and not v.is_floating_point() and v.numel() and _checking(v):
            lim = 2**62 if name == "offset" else None
            bad = (v < 0) if lim is None else ((v < 0) | (v >= lim))
            if bool(bad.any()):  # the same rule as for ints (checked when value checks are on)
                raise ValueError(f"{name}: expected values in [0, {hi}), got {int(v.reshape(-1)[bad.reshape(-1)][0])}")
    if isinstance(seed, torch.Tensor):
        if seed.dtype not in (torch.int64, torch.int32) or seed.numel() not in (1, B) or seed.dim() > 1:
            raise ValueError(f"seed: expected an integer tensor of shape [{B}] (one seed per sample) or [1], "
                             f"got {_dtype_name(seed.dtype)} of shape {tuple(seed.shape)}")
        if seed.device != device:
            raise ValueError(f"seed: expected a tensor on {device} (the data's device), got {seed.device}")
        seed = seed.to(dtype=torch.int64).reshape(-1)
    if isinstance(offset, torch.Tensor):
        if offset.dtype not in (torch.int64, torch.int32) or offset.dim() > 1:
            raise ValueError(f"offset: expected an integer tensor of shape [{B}] or [1], "
                             f"got {_dtype_name(offset.dtype)} of shape {tuple(offset.shape)}")
        if offset.device != device:
            raise ValueError(f"offset: expected a tensor on {device} (the data's device), got {offset.device}")
        off = offset.to(dtype=torch.int64).reshape(-1)
        if isinstance(seed, int):
            seed = torch.full_like(off, seed)
    else:
        off = torch.full_like(seed, offset)
    if off.numel() not in (1, seed.numel()):
        raise ValueError(f"offset: expected one value or one per seed ({seed.numel()}), got shape {tuple(off.shape)}")
    if seed.numel() == 1 and off.numel() > 1:
        seed = seed.expand_as(off)
    return torch.stack([seed, off.expand_as(seed)], dim=1)


def no_rng(seed, offset, device: torch.device) -> torch.Tensor:
    """The rng argument of an op call that draws no noise: the arguments are checked, nothing is
    computed (an uninitialised [1, 2] placeholder the kernels never read)."""
    _check_seed_offset(seed, offset)
    return torch.empty((1, 2), dtype=torch.int64, device=device)


def layout_of(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def same_layout(t: Optional[torch.Tensor], fmt: torch.memory_format) -> Optional[torch.Tensor]:
    """``t`` in memory format ``fmt`` (a no-op when it already is); kernels read all inputs alike."""
    if t is None:
        return None
    if fmt == torch.channels_last and t.dim() != 4:
        return t.contiguous()
    return t.contiguous(memory_format=fmt)


def layout(first: torch.Tensor, *others: Optional[torch.Tensor]) -> list:
    """The layout rule (module docstring): ``first`` contiguous or channels_last as it is, else copied
    to contiguous; every tensor of ``others`` (None passes through) in ``first``'s layout."""
    fmt = layout_of(first)
    return [same_layout(first, fmt)] + [same_layout(t, fmt) for t in others]


def clamp(v, device, dtype=torch.float32) -> torch.Tensor:
    if v is None:
        return torch.full((1,), math.inf, dtype=dtype, device=device)
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"clamp: expected a single value, got shape {tuple(v.shape)}")
        if _checking(v) and not bool(v.reshape(()) > 0):
            raise ValueError(f"clamp: expected a positive value (or inf / None for no clamp), got {v.item()}")
        return v.reshape(1).to(device=device, dtype=dtype)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise ValueError(f"clamp: expected a positive number, math.inf or None, got {v!r}")
    return torch.full((1,), float(v), dtype=dtype, device=device)


Number = Union[int, float]
