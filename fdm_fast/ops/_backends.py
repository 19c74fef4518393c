"""Which backends exist on this machine, and which one an op call runs on (docs/design.md 2.1).

Default: CUDA tensor -> cuda, else triton, else torch; CPU tensor -> cpu, else torch. The compiled
``cuda`` ops come first because they cost less per call: on an H200 (2026-11-29, benchmarks/RESULTS.md)
a call of the cuda backend took 1.8x-2.9x less time than the same triton op in each of the 20
ops_bandwidth rows, both at tens of microseconds, where Triton's Python launch path is the cost. The
``backend=`` argument of every op, then the ``FDM_FAST_BACKEND`` environment variable, override the
default. Asking for a backend that is not available is an error, never a silent fallback.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Optional

import torch

BACKENDS = ("torch", "triton", "cuda", "cpu")
ENV_VAR = "FDM_FAST_BACKEND"


# Loaded modules, kept in plain module globals: torch.compile reads these while tracing an op call
# (it cannot trace importlib), and every load happens eagerly inside the constant-folded `select`.
_LOADED: dict = {}
_WHY: dict = {}


def _triton_modules():
    """(perturb, loss, sampler) Triton modules, or the reason they cannot be loaded."""
    if "triton" not in _LOADED and "triton" not in _WHY:
        try:
            import triton  # noqa: F401
        except Exception as e:  # ImportError, or a broken install
            _WHY["triton"] = f"Triton is not importable ({type(e).__name__}: {e})"
        else:
            try:
                _LOADED["triton"] = tuple(importlib.import_module(f"fdm_fast.ops.{m}")
                                          for m in ("triton_perturb", "triton_loss", "triton_sampler"))
            except Exception as e:
                _WHY["triton"] = f"the Triton kernels failed to load ({type(e).__name__}: {e})"
    return _LOADED.get("triton"), _WHY.get("triton", "")


def extension() -> tuple[Optional[ModuleType], str]:
    """``fdm_fast.ops.extension`` (the loaded ``fdm_fast._C``) and the reason when it is missing."""
    if "ext" not in _LOADED and "ext" not in _WHY:
        try:
            _LOADED["ext"] = importlib.import_module("fdm_fast.ops.extension")
        except ValueError:  # a bad setting (FDM_FAST_CPU_ISA), not a missing build: say so, do not fall back
            raise
        except Exception as e:
            _WHY["ext"] = (f"the compiled extension fdm_fast._C is not built ({type(e).__name__}: {e}); "
                           "build it with `pip install --no-build-isolation -e .` on a machine with a C++ compiler")
    return _LOADED.get("ext"), _WHY.get("ext", "")


def _interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(backend: str, device: Optional[torch.device] = None) -> str:
    """Empty when ``backend`` can run on ``device`` (any device when None), else why not."""
    if backend == "torch":
        return ""
    if backend == "triton":
        mods, why = _triton_modules()
        if mods is None:
            return why
        if device is None:
            if torch.cuda.is_available() or _interpreter():
                return ""
            return "no CUDA device and TRITON_INTERPRET is not set"
        if device.type == "cuda":
            return "" if torch.cuda.is_available() else "no CUDA device is visible"
        if device.type == "cpu":
            return "" if _interpreter() else "Triton runs CPU tensors only under TRITON_INTERPRET=1 (the interpreter)"
        return f"Triton does not run on {device.type} tensors"
    if backend in ("cuda", "cpu"):
        ext, why = extension()
        if ext is None:
            return why
        if not (ext.has_cuda() if backend == "cuda" else ext.has_cpu()):
            return f"fdm_fast._C was built without its {backend} kernels"
        if backend == "cuda" and not torch.cuda.is_available():
            return "no CUDA device is visible"
        if device is not None and device.type != backend:
            return f"the {backend} backend runs {backend} tensors, got a {device.type} tensor"
        return ""
    return f"unknown backend (expected one of {', '.join(BACKENDS)})"


def available_backends(device=None) -> list[str]:
    """The backends that can run on ``device`` (a device or its name; any device when None)."""
    device = torch.device(device) if device is not None else None
    return [b for b in BACKENDS if not unavailable_reason(b, device)]


# Ops that not every backend implements: {op: the backends that do}. The default order skips the
# others; asking for one of them (backend= or the environment) is an error naming the op.
PARTIAL: dict = {}  # every op is implemented by every backend today

# Ops whose default order on CUDA tensors differs: the solvers' step runs inside CUDA graphs
# (GraphedSampler, generate's default), where device time counts and the Triton step kernels were
# 5-20% faster than the compiled ones on the H200 (benchmarks/RESULTS.md, 2026-11-29).
CUDA_ORDER = {"multistep": ("triton", "cuda", "torch")}


def select(device: torch.device, backend: Optional[str] = None, op: str = "") -> str:
    """The backend an op on ``device`` runs on: explicit > $FDM_FAST_BACKEND > default order."""
    return _select(device.type, backend, os.environ.get(ENV_VAR) or None, op)


@torch.compiler.assume_constant_result  # evaluated eagerly when torch.compile traces an op call
def _select(device_type: str, backend: Optional[str], env: Optional[str], op: str = "") -> str:
    device = torch.device(device_type)
    has = PARTIAL.get(op, BACKENDS)
    asked, source = backend, "backend"
    if asked is None and env:
        asked, source = env, f"${ENV_VAR}"
    if asked is not None:
        if not isinstance(asked, str) or asked not in BACKENDS:
            raise ValueError(f"{source}: expected one of {', '.join(BACKENDS)}, got {asked!r}")
        why = unavailable_reason(asked, device)
        if why:
            raise ValueError(f"{source}={asked!r} is not available for {device.type} tensors: {why}")
        if asked not in has:
            raise ValueError(f"{source}={asked!r}: the {asked} backend does not implement ops.{op} "
                             f"(it runs on {', '.join(has)})")
        return asked
    order = CUDA_ORDER.get(op, ("cuda", "triton", "torch")) if device.type == "cuda" else ("cpu", "torch")
    for b in order:
        if b in has and not unavailable_reason(b, device):
            return b
    return "torch"


def triton_module(name: str) -> ModuleType:
    mods = _LOADED.get("triton")
    if mods is None:
        mods, why = _triton_modules()
        if mods is None:
            raise RuntimeError(why)
    return mods[("perturb", "loss", "sampler").index(name)]


def loaded_extension() -> ModuleType:
    ext = _LOADED.get("ext")
    if ext is None:
        ext, why = extension()
        if ext is None:
            raise RuntimeError(why)
    return ext
