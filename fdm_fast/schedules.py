"""The math of FDM and its base preconditionings (docs/design.md section 1): the single source of truth.

Every formula here is written the way EDM (Karras et al. 2022) and FDM (Wu et al. 2023) write it.
All functions take a float or a tensor of per-sample ``sigma`` and work in the tensor's dtype, so
float64 inputs give float64 results (the tests rely on that). The fused ops compute the same
formulas in-kernel from ``Precond.kernel_spec()``; nothing else in the package re-derives them.

A preconditioning turns the raw network ``F`` into the denoiser

    D(x; sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, c_noise(sigma))

and is trained with the weight ``lambda(sigma) = loss_weight(sigma)`` on ``|D(y + sigma n) - y|^2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar, Optional, Union

import torch

Sigma = Union[float, torch.Tensor]

# Kernel-facing identifiers of the base preconditioning (kept in sync with ops/triton_common.py and
# csrc/include/fdm_math.h, which switch on them).
KIND_VP, KIND_VE, KIND_EDM = 0, 1, 2

# Number of float parameters in a kernel spec; the layout is documented in Precond.kernel_spec.
N_KERNEL_PARAMS = 8


def _t(sigma: Sigma) -> torch.Tensor:
    return sigma if isinstance(sigma, torch.Tensor) else torch.as_tensor(sigma, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# VP helpers (Song et al. 2021, as parameterised in EDM).


def vp_sigma(t: Sigma, beta_d: float = 19.9, beta_min: float = 0.1) -> torch.Tensor:
    """sigma_vp(t) = sqrt(exp(0.5 * beta_d * t^2 + beta_min * t) - 1)."""
    t = _t(t)
    return torch.expm1(0.5 * beta_d * t**2 + beta_min * t).sqrt()


def vp_sigma_inv(sigma: Sigma, beta_d: float = 19.9, beta_min: float = 0.1) -> torch.Tensor:
    """t such that sigma_vp(t) = sigma: (sqrt(beta_min^2 + 2 beta_d ln(1 + sigma^2)) - beta_min) / beta_d."""
    sigma = _t(sigma)
    return ((beta_min**2 + 2 * beta_d * torch.log1p(sigma**2)).sqrt() - beta_min) / beta_d


# ----------------------------------------------------------------------------------------------
# Preconditionings.


@dataclass(frozen=True)
class Precond:
    """Base class. Subclasses define the four coefficients, the weight and the sigma distribution.

    ``fdm`` switches ``c_in`` to FDM's critically damped mean coefficient (docs/design.md 1.2):

        tau = (sigma - sigma_min) / (sigma_max - sigma_min)
        B   = fdm_beta_min * tau + 0.5 * fdm_beta_d * tau^2
        c_in = exp(-m B) (1 + m B),   m = fdm_multiplier
    """

    name: str = ""
    sigma_min: float = 0.0
    sigma_max: float = 0.0
    fdm: bool = False
    fdm_multiplier: float = 1.0
    fdm_beta_min: float = 0.1
    fdm_beta_d: float = 19.9

    # which formulas the kernels use; a class constant, not a field (torch 2.6's dynamo rebuilds a
    # frozen dataclass passed to an autograd.Function from all its fields, init=False ones included)
    kind: ClassVar[int] = -1

    # -- per-preconditioning pieces, overridden below --------------------------------------------
    def c_skip(self, sigma: Sigma) -> torch.Tensor:
        raise NotImplementedError

    def c_out(self, sigma: Sigma) -> torch.Tensor:
        raise NotImplementedError

    def base_c_in(self, sigma: Sigma) -> torch.Tensor:
        raise NotImplementedError

    def c_noise(self, sigma: Sigma) -> torch.Tensor:
        raise NotImplementedError

    def loss_weight(self, sigma: Sigma) -> torch.Tensor:
        """lambda(sigma), the per-sample weight of the squared error."""
        raise NotImplementedError

    def sample_sigma(self, n: int, *, generator: Optional[torch.Generator] = None,
                     device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Draw the training noise levels of a batch of ``n`` samples."""
        raise NotImplementedError

    def sigma_from_uniform(self, u: torch.Tensor) -> torch.Tensor:
        """The training sigma as a function of one uniform u in (0, 1) per sample (inverse CDF), so that
        a sample's sigma can be a pure function of its own key (see fdm_fast.loss.sample_uniforms)."""
        raise NotImplementedError

    def _kernel_base_params(self) -> tuple:
        return (0.0, 0.0, 0.0)

    # -- shared -----------------------------------------------------------------------------------
    def fdm_c_in(self, sigma: Sigma) -> torch.Tensor:
        """FDM's critically damped mean coefficient s(sigma); 1 at sigma_min, decreasing."""
        sigma = _t(sigma)
        tau = (sigma - self.sigma_min) / (self.sigma_max - self.sigma_min)
        big_b = self.fdm_beta_min * tau + 0.5 * self.fdm_beta_d * tau**2
        mb = self.fdm_multiplier * big_b
        return torch.exp(-mb) * (1 + mb)

    def c_in(self, sigma: Sigma) -> torch.Tensor:
        return self.fdm_c_in(sigma) if self.fdm else self.base_c_in(sigma)

    def coefficients(self, sigma: Sigma):
        """(c_skip, c_out, c_in, c_noise) at ``sigma``, each shaped like ``sigma``."""
        sigma = _t(sigma)
        return self.c_skip(sigma), self.c_out(sigma), self.c_in(sigma), self.c_noise(sigma)

    def clip_sigma(self, sigma: float) -> float:
        return min(max(float(sigma), self.sigma_min), self.sigma_max)

    def kernel_spec(self) -> tuple:
        """What the fused kernels need to recompute the coefficients: ``(kind, fdm, params)``.

        params (8 floats): [sigma_data, vp_beta_d, vp_beta_min, sigma_min, sigma_max,
        fdm_multiplier, fdm_beta_min, fdm_beta_d]. Entries a preconditioning does not use are 0.
        """
        sd, bd, bm = self._kernel_base_params()
        params = (float(sd), float(bd), float(bm), float(self.sigma_min), float(self.sigma_max),
                  float(self.fdm_multiplier), float(self.fdm_beta_min), float(self.fdm_beta_d))
        return self.kind, bool(self.fdm), params

    def with_options(self, **kwargs) -> "Precond":
        return replace(self, **kwargs)


@dataclass(frozen=True)
class VPPrecond(Precond):
    """Variance preserving (Song et al. 2021), EDM's ``VPPrecond`` / ``VPLoss``."""

    name: str = "vp"
    beta_d: float = 19.9
    beta_min: float = 0.1
    M: int = 1000
    epsilon_t: float = 1e-5
    sigma_min: float = float(vp_sigma(1e-5).item())
    sigma_max: float = float(vp_sigma(1.0).item())
    kind: ClassVar[int] = KIND_VP

    def c_skip(self, sigma):
        return torch.ones_like(_t(sigma))

    def c_out(self, sigma):
        return -_t(sigma)

    def base_c_in(self, sigma):
        sigma = _t(sigma)
        return 1 / (sigma**2 + 1).sqrt()

    def c_noise(self, sigma):
        return (self.M - 1) * vp_sigma_inv(sigma, self.beta_d, self.beta_min)

    def loss_weight(self, sigma):
        return 1 / _t(sigma) ** 2

    def sample_sigma(self, n, *, generator=None, device="cpu", dtype=torch.float32):
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        return self.sigma_from_uniform(u).to(dtype)

    def sigma_from_uniform(self, u):
        return vp_sigma(1 + u * (self.epsilon_t - 1), self.beta_d, self.beta_min)

    def _kernel_base_params(self):
        return (0.0, self.beta_d, self.beta_min)


@dataclass(frozen=True)
class VEPrecond(Precond):
    """Variance exploding (Song et al. 2021), EDM's ``VEPrecond`` / ``VELoss``."""

    name: str = "ve"
    sigma_min: float = 0.02
    sigma_max: float = 100.0
    kind: ClassVar[int] = KIND_VE

    def c_skip(self, sigma):
        return torch.ones_like(_t(sigma))

    def c_out(self, sigma):
        return _t(sigma).clone()

    def base_c_in(self, sigma):
        return torch.ones_like(_t(sigma))

    def c_noise(self, sigma):
        return torch.log(0.5 * _t(sigma))

    def loss_weight(self, sigma):
        return 1 / _t(sigma) ** 2

    def sample_sigma(self, n, *, generator=None, device="cpu", dtype=torch.float32):
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        return self.sigma_from_uniform(u).to(dtype)

    def sigma_from_uniform(self, u):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** u


@dataclass(frozen=True)
class EDMPrecond(Precond):
    """EDM (Karras et al. 2022), ``EDMPrecond`` / ``EDMLoss``."""

    name: str = "edm"
    sigma_data: float = 0.5
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    kind: ClassVar[int] = KIND_EDM

    def c_skip(self, sigma):
        sigma = _t(sigma)
        return self.sigma_data**2 / (sigma**2 + self.sigma_data**2)

    def c_out(self, sigma):
        sigma = _t(sigma)
        return sigma * self.sigma_data / (sigma**2 + self.sigma_data**2).sqrt()

    def base_c_in(self, sigma):
        sigma = _t(sigma)
        return 1 / (sigma**2 + self.sigma_data**2).sqrt()

    def c_noise(self, sigma):
        return torch.log(_t(sigma)) / 4

    def loss_weight(self, sigma):
        sigma = _t(sigma)
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def sample_sigma(self, n, *, generator=None, device="cpu", dtype=torch.float32):
        rnd = torch.randn(n, generator=generator, device=device, dtype=torch.float64)
        return (rnd * self.P_std + self.P_mean).exp().to(dtype)

    def sigma_from_uniform(self, u):
        rnd = math.sqrt(2) * torch.special.erfinv(2 * u.to(torch.float64) - 1)  # standard normal quantile
        return (rnd * self.P_std + self.P_mean).exp()

    def _kernel_base_params(self):
        return (self.sigma_data, 0.0, 0.0)


# FDM default multiplier. The official training CLI (sail-sg/FDM train.py) defaults to 2.0 and its
# CIFAR-10 results use it; the Precond classes there default to 1.0 and the FFHQ recipe passes 1.
# fdm_fast follows the CLI (2.0) for fdm_vp / fdm_edm. The official VE variant ignores the
# multiplier (always m = 1), so fdm_ve defaults to 1.0; any value may be passed explicitly.
DEFAULT_FDM_MULTIPLIER = {"fdm_vp": 2.0, "fdm_ve": 1.0, "fdm_edm": 2.0}

PRECONDS = ("vp", "ve", "edm", "fdm_vp", "fdm_ve", "fdm_edm")
_BASE = {"vp": VPPrecond, "ve": VEPrecond, "edm": EDMPrecond}


def get_precond(name: Union[str, Precond], **options) -> Precond:
    """The preconditioning called ``name`` (one of ``PRECONDS``), with optional overrides.

    ``fdm_multiplier=`` applies to the ``fdm_*`` variants (defaults in ``DEFAULT_FDM_MULTIPLIER``);
    other keywords override the dataclass fields (``sigma_data``, ``sigma_min``, ...).
    """
    if isinstance(name, Precond):
        return name.with_options(**options) if options else name
    if not isinstance(name, str) or name not in PRECONDS:
        raise ValueError(f"precond: expected one of {', '.join(PRECONDS)}, got {name!r}")
    fdm = name.startswith("fdm_")
    base = _BASE[name[4:] if fdm else name]
    if fdm:
        options.setdefault("fdm_multiplier", DEFAULT_FDM_MULTIPLIER[name])
    elif "fdm_multiplier" in options:
        raise ValueError(f"fdm_multiplier: only the fdm_* preconditionings take it, got precond={name!r}")
    p = base(name=name, fdm=fdm, **options)
    if not (0 < p.sigma_min < p.sigma_max and math.isfinite(p.sigma_max)):
        raise ValueError(f"sigma range: expected 0 < sigma_min < sigma_max < inf, got [{p.sigma_min}, {p.sigma_max}]")
    if fdm and not (p.fdm_multiplier > 0 and math.isfinite(p.fdm_multiplier)):
        raise ValueError(f"fdm_multiplier: expected a positive finite number, got {p.fdm_multiplier}")
    return p


# ----------------------------------------------------------------------------------------------
# Loss-weight warm-up (FDM runs), docs/design.md 1.2.


def warmup_clamp(step: int, warmup_ite: Optional[int]) -> float:
    """The cap on lambda at optimizer step ``step``: ``5 * 100^(step / warmup_ite)`` while below 500.

    Returns ``math.inf`` (no cap) once the cap reaches 500, or when ``warmup_ite`` is None/0.
    The official code advances its counter at every loss call (gradient-accumulation rounds included)
    and keeps it only in memory, so a resumed run restarts the warm-up; fdm_fast derives it from the
    optimizer step, which is saved with the checkpoint, so resume is exact.
    """
    if not warmup_ite:
        return math.inf
    if step < 0:
        raise ValueError(f"step: expected a non-negative optimizer step, got {step}")
    clamp = 5.0 * 100.0 ** (step / warmup_ite)
    return clamp if clamp < 500.0 else math.inf


# ----------------------------------------------------------------------------------------------
# EDM sampler time steps, docs/design.md 1.3.


def edm_time_steps(num_steps: int = 18, *, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                   precond: Optional[Precond] = None, dtype: torch.dtype = torch.float64,
                   device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """``num_steps + 1`` noise levels: the EDM discretization followed by ``sigma_N = 0``.

    sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho, i = 0..N-1. With ``precond``
    given, smin and smax are first clipped to its supported range, as EDM's sampler does.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: expected an integer >= 1, got {num_steps!r}")
    if not rho > 0:
        raise ValueError(f"rho: expected a positive number, got {rho}")
    if precond is not None:
        sigma_min = max(sigma_min, precond.sigma_min)
        sigma_max = min(sigma_max, precond.sigma_max)
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"sigma range: expected 0 < sigma_min <= sigma_max, got [{sigma_min}, {sigma_max}]")
    i = torch.arange(num_steps, dtype=torch.float64)
    denom = max(num_steps - 1, 1)
    t = (sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64)])
    return t.to(dtype=dtype, device=device)


SCHEDULES = ("edm", "logsnr", "time")


def time_steps(num_steps: int = 18, schedule: str = "edm", *, sigma_min: float = 0.002, sigma_max: float = 80.0,
               rho: float = 7.0, precond: Optional[Precond] = None, dtype: torch.dtype = torch.float64,
               device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """``num_steps + 1`` noise levels from sigma_max down to sigma_min, then 0, spaced by ``schedule``:

    edm     EDM's rho schedule (edm_time_steps; rho = 7 is EDM's choice)
    logsnr  uniform in log sigma (log-SNR = -2 log sigma): DPM-Solver's "logSNR" steps
    time    uniform in the preconditioning's diffusion time t (EDM Table 1): VP t with sigma = vp_sigma(t)
            (DPM-Solver's "time_uniform"), t = sigma^2 for VE, t = sigma for EDM (and with no precond)
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if schedule == "edm":
        return edm_time_steps(num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, precond=precond,
                              dtype=dtype, device=device)
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps: expected an integer >= 1, got {num_steps!r}")
    if precond is not None:
        sigma_min, sigma_max = max(sigma_min, precond.sigma_min), min(sigma_max, precond.sigma_max)
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"sigma range: expected 0 < sigma_min <= sigma_max, got [{sigma_min}, {sigma_max}]")
    u = torch.linspace(0, 1, num_steps, dtype=torch.float64) if num_steps > 1 else torch.zeros(1, dtype=torch.float64)
    if schedule == "logsnr":
        t = torch.exp(math.log(sigma_max) + u * (math.log(sigma_min) - math.log(sigma_max)))
    else:
        kind = precond.kind if precond is not None else KIND_EDM
        if kind == KIND_VP:
            bd, bm = precond.beta_d, precond.beta_min
            lo, hi = float(vp_sigma_inv(sigma_min, bd, bm)), float(vp_sigma_inv(sigma_max, bd, bm))
            t = vp_sigma(hi + u * (lo - hi), bd, bm)
        elif kind == KIND_VE:
            t = (sigma_max**2 + u * (sigma_min**2 - sigma_max**2)).sqrt()
        else:
            t = sigma_max + u * (sigma_min - sigma_max)
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64)])
    return t.to(dtype=dtype, device=device)
