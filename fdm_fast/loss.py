"""The training loss on the fused ops: sigma ~ the preconditioning's training distribution,
net_in = perturb(y) (one pass), F = UNet(net_in), loss = fused weighted denoising loss (one pass each way).

Every random quantity of a training sample (sigma, flip, noise) is a pure function of the run seed
and the sample's global index (``sample_uniforms``, ``noise_rng``): a run is reproducible, a resumed
run draws exactly what the uninterrupted one would have, and N ranks draw what one process would.
The FDM warm-up clamp is a function of the optimizer step (``schedules.warmup_clamp``), saved with
the checkpoint.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch

from . import ops
from .nn.precond import Denoiser
from .ops.reference import MASK32, philox4x32_10
from .schedules import warmup_clamp


def sample_uniforms(seed: int, keys: torch.Tensor, k: int = 2) -> torch.Tensor:
    """``k`` uniforms in (0, 1) per sample [B, k] (float64), a pure function of (seed, key): Philox at
    key ``seed`` and counter (key, 2^31 + j). Training draws a sample's sigma and flip from these and its
    noise from the contract at (seed, key * ceil(P / 4)), so all its randomness depends on its global
    index alone: the same for any number of ranks, and exact on resume."""
    keys = keys.to(torch.int64).cpu()
    seed_t = torch.tensor(seed % 2**62, dtype=torch.int64)
    out = []
    for j in range((k + 3) // 4):
        c0, c1 = keys & MASK32, (keys >> 32) & MASK32
        z = torch.zeros_like(c0)
        r = philox4x32_10(c0, c1, z + (2**31 + j), z, seed_t & MASK32, (seed_t >> 32) & MASK32)
        out += [(v.to(torch.float64) + 0.5) / 2**32 for v in r]
    return torch.stack(out[:k], dim=1)


def noise_rng(seed: int, keys: torch.Tensor, per_sample: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (seed, offset) for the fused ops: disjoint counter ranges, one per global sample index."""
    keys = keys.to(device=device, dtype=torch.int64)
    return torch.full_like(keys, seed % 2**62), keys * ((per_sample + 3) // 4)


def fdm_clamp(denoiser: Denoiser, step: int, warmup_ite: Optional[int]) -> Optional[float]:
    """The loss-weight cap at this optimizer step: FDM preconditionings only (docs/design.md 1.2)."""
    if not denoiser.precond.fdm or not warmup_ite:
        return None
    c = warmup_clamp(step, warmup_ite)
    return None if math.isinf(c) else c


def training_loss(denoiser: Denoiser, y: torch.Tensor, sigma: torch.Tensor, *, seed, offset,
                  clamp: Optional[float], labels: Optional[torch.Tensor] = None,
                  augment_labels: Optional[torch.Tensor] = None, net_dtype: torch.dtype = torch.float32,
                  backend: Optional[str] = None) -> torch.Tensor:
    """Per-sample loss [B]: min(lambda, clamp) * sum_j (D_j - y_j)^2 (EDM's loss summed over pixels).

    ``net_dtype`` bfloat16 runs the network under autocast; its input and output stay in bf16 and the
    fused loss upcasts them (coefficients and accumulation in float32).
    """
    p = denoiser.precond
    net_in = ops.perturb(y, sigma, p, seed=seed, offset=offset, out_dtype=net_dtype, backend=backend)
    amp = torch.autocast(device_type=y.device.type, dtype=torch.bfloat16) if net_dtype == torch.bfloat16 \
        else contextlib.nullcontext()
    with amp:
        F = denoiser.raw(net_in, sigma, labels, augment_labels)
    return ops.denoise_loss(F, y, sigma, p, seed=seed, offset=offset, clamp=clamp, reduction="none",
                            backend=backend)


def training_loss_composite(denoiser: Denoiser, y: torch.Tensor, sigma: torch.Tensor, *, seed, offset,
                            clamp: Optional[float], labels=None, augment_labels=None) -> torch.Tensor:
    """The same loss written op by op as the official code does (float32, plain autograd): the spec
    ``training_loss`` is tested against. Noise from the same contract, so both see the same draw."""
    n = ops.randn(y.shape, seed=seed, offset=offset, device=y.device, backend="torch")
    s = sigma.reshape(-1, 1, 1, 1).float()
    D = denoiser(y.float() + s * n, sigma, labels, augment_labels)
    w = denoiser.precond.loss_weight(s)
    if clamp is not None:
        w = torch.clamp(w, max=clamp)
    return (w * (D - y.float()) ** 2).flatten(1).sum(1)
