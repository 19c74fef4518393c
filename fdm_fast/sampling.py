"""Samplers on the fused step ops (docs/design.md 1.3): EDM's Heun (deterministic or with churn) and Euler,
GraphedSampler (any sampler or solver as one CUDA graph), and the DPM-Solver++(2M) / iPNDM entry points
of earlier versions, now ``fdm_fast.solvers`` (1.4).

Sampler state is float32; the network runs in ``net_dtype``. Noise comes from the noise contract
keyed by each image's own seed (per-sample seeds), so an image depends on its seed only, never on
the batch it was drawn in: the initial noise at offset 0, the churn noise of step i at offset
(i + 1) * ceil(P / 4) (P = elements per image), disjoint counter ranges.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from . import ops, solvers
from .schedules import edm_time_steps


def _gammas(t: Sequence[float], num_steps: int, S_churn: float, S_min: float, S_max: float) -> list:
    g = min(S_churn / num_steps, math.sqrt(2) - 1) if S_churn > 0 else 0.0
    return [g if S_min <= float(t[i]) <= S_max else 0.0 for i in range(num_steps)]


def seed_labels(seeds: Union[Sequence[int], torch.Tensor], label_dim: int, device=None,
                class_idx: Optional[int] = None) -> Optional[torch.Tensor]:
    """One-hot class labels [len(seeds), label_dim] (float32) for a batch of seeds, by the convention every
    tool here shares: seed s draws class s % label_dim, or ``class_idx`` for every seed when given. None
    when ``label_dim`` is 0 (an unconditional network)."""
    if not label_dim:
        return None
    seeds = torch.as_tensor(seeds, dtype=torch.int64, device=device).reshape(-1)
    classes = seeds % label_dim if class_idx is None else torch.full_like(seeds, class_idx)
    return torch.nn.functional.one_hot(classes, label_dim).float()


def _setup(denoiser, seeds, num_steps, sigma_min, sigma_max, rho, device, backend, class_labels):
    """(device, seeds, batch size, precond, time steps as floats ending at 0, x at t[0]) of a sampler."""
    device = ops.canonical_device(device) if device is not None else next(denoiser.parameters()).device
    seeds = solvers.as_seeds(seeds, device)
    B = seeds.numel()
    solvers.check_class_labels(denoiser, class_labels, B)
    shape = (B, denoiser.img_channels, denoiser.img_resolution, denoiser.img_resolution)
    p = denoiser.precond
    t = [float(v) for v in edm_time_steps(num_steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, precond=p)]
    x = t[0] * ops.randn(shape, seed=seeds, offset=0, device=device, backend=backend)
    return device, seeds, B, p, t, x


@torch.no_grad()
def edm_sampler(denoiser, seeds: Union[Sequence[int], torch.Tensor], *, num_steps: int = 18,
                sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, S_churn: float = 0.0,
                S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0, heun: bool = True,
                class_labels: Optional[torch.Tensor] = None, net_dtype: torch.dtype = torch.float32,
                device=None, backend: Optional[str] = None) -> torch.Tensor:
    """Images [len(seeds), C, H, W] (float32, about [-1, 1]) from ``denoiser`` (a ``nn.Denoiser`` or any
    object with ``precond``, ``img_channels``, ``img_resolution`` and ``raw(net_in, sigma, labels)``).

    ``heun=False`` gives Euler (NFE = num_steps); Heun has NFE = 2 num_steps - 1.
    """
    device, seeds, B, p, ts, x = _setup(denoiser, seeds, num_steps, sigma_min, sigma_max, rho, device, backend,
                                        class_labels)
    stride = (math.prod(x.shape[1:]) + 3) // 4  # counters one image's noise uses
    gam = _gammas(ts, num_steps, S_churn, S_min, S_max)
    kw = dict(net_dtype=net_dtype, backend=backend)

    t_hat = ts[0] * (1 + gam[0])
    x_hat, net_in = ops.churn(x, ts[0], t_hat, p, seed=seeds, offset=stride, S_noise=S_noise, **kw)
    for i in range(num_steps):
        t_next = ts[i + 1]
        F = denoiser.raw(net_in, torch.full((B,), t_hat, device=device), class_labels)
        last = i == num_steps - 1
        # Heun needs the slope d (its kernel recomputes the Euler point), Euler and the last step x_eul
        x_eul, d, net_in = ops.euler_step(x_hat, F, t_hat, t_next, p, return_x=last or not heun,
                                          return_d=heun and not last, **kw)
        if last:
            return x_eul
        t_hat_next = t_next * (1 + gam[i + 1])
        churn_next = dict(t_hat_next=t_hat_next, seed=seeds, offset=(i + 2) * stride, S_noise=S_noise) \
            if gam[i + 1] > 0 else {}
        if heun:
            F2 = denoiser.raw(net_in, torch.full((B,), t_next, device=device), class_labels)
            x_hat, net_in = ops.heun_step(x_hat, d, F2, t_hat, t_next, p, **churn_next, **kw)
        elif churn_next:
            x_hat, net_in = ops.churn(x_eul, t_next, t_hat_next, p, seed=seeds, offset=(i + 2) * stride,
                                      S_noise=S_noise, **kw)
        else:
            x_hat = x_eul
        t_hat = t_hat_next if churn_next else t_next
    return x_hat


def dpm_solver_pp_2m(denoiser, seeds: Union[Sequence[int], torch.Tensor], *, num_steps: int = 18,
                     sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                     class_labels: Optional[torch.Tensor] = None, net_dtype: torch.dtype = torch.float32,
                     device=None, backend: Optional[str] = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022), multistep second order in data prediction, on EDM's sigma
    discretization: NFE = num_steps. With lambda = -log sigma and h = lambda_next - lambda,

        x_next = (sigma_next / sigma) x - expm1(-h) D_i',  D_i' = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1},
        r = h_last / h  (first step and the last step to sigma = 0 use D_i alone).

    ``solvers.sample(solver="dpm++2m")``, every step one fused ops.multistep call; the other solvers
    (DPM-Solver++(3M), UniPC, the SDE variant, the official FDM code's DPM-Solver) and guidance are there.
    """
    return solvers.sample(denoiser, seeds, solver="dpm++2m", steps=num_steps, sigma_min=sigma_min,
                          sigma_max=sigma_max, rho=rho, class_labels=class_labels, net_dtype=net_dtype, device=device,
                          backend=backend)


ADAMS_BASHFORTH = solvers.ADAMS_BASHFORTH  # weights of orders 1-4 for equal steps, newest slope first


def ipndm_step(x: torch.Tensor, slopes: Sequence[torch.Tensor], s: float, s_next: float) -> torch.Tensor:
    """One iPNDM step in plain tensor arithmetic (a reference for tests): x + (s_next - s) * sum_j w_j d_j
    with the Adams-Bashforth weights of order len(slopes) (newest slope first), whatever the step sizes."""
    w = ADAMS_BASHFORTH[len(slopes)]
    return x + (s_next - s) * sum(wj * d for wj, d in zip(w, slopes))


def ipndm(denoiser, seeds: Union[Sequence[int], torch.Tensor], *, num_steps: int = 10, max_order: int = 4,
          sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
          class_labels: Optional[torch.Tensor] = None, net_dtype: torch.dtype = torch.float32,
          device=None, backend: Optional[str] = None) -> torch.Tensor:
    """iPNDM (Zhang & Chen 2023; the 4th-order form benchmarked by zju-pi/diff-sampler): explicit
    Adams-Bashforth on EDM's ODE dx/dsigma = (x - D(x, sigma)) / sigma over EDM's sigma steps, with
    the last ``max_order`` slopes (order 1, 2, ... while they accumulate): NFE = num_steps, one
    network call per step. ``solvers.sample(solver="ipndm", order=max_order)``."""
    if max_order not in ADAMS_BASHFORTH:
        raise ValueError(f"max_order: expected 1, 2, 3 or 4, got {max_order!r}")
    return solvers.sample(denoiser, seeds, solver="ipndm", steps=num_steps, order=max_order, sigma_min=sigma_min,
                          sigma_max=sigma_max, rho=rho, class_labels=class_labels, net_dtype=net_dtype, device=device,
                          backend=backend)


class GraphedSampler:
    """A sampler captured once as a CUDA graph for a fixed batch size and settings, replayed for any
    seeds (and class labels): the whole loop (the UNet's kernels and the fused step ops) launches as
    one graph, so small batches are not bound by kernel-launch latency. ``sampler`` is any sampler of
    this module (``edm_sampler``, deterministic or with churn, Heun or Euler; ``dpm_solver_pp_2m``; ``ipndm``)
    or ``fdm_fast.solvers.sample`` with any of its solvers, with its keyword arguments. Seeds and labels
    live in static device buffers that the captured ops read; ``__call__`` copies new ones in and
    replays. Capture needs ops that neither sync nor copy from the host, which every op here satisfies
    (tests/test_sync_free.py; on a GPU, tests/test_sampling.py compares each sampler's and each solver's
    replay with its eager run).

        sampler = GraphedSampler(net, batch=64, num_steps=18)              # deterministic Heun
        images = sampler(range(64))          # == edm_sampler(net, range(64), num_steps=18)
        dpm = GraphedSampler(net, batch=64, sampler=dpm_solver_pp_2m, num_steps=10)
        unipc = GraphedSampler(net, batch=64, sampler=fdm_fast.solvers.sample, solver="unipc", num_steps=8)
    """

    def __init__(self, denoiser, batch: int, *, sampler=edm_sampler, warmup: int = 2, **kwargs):
        if not torch.cuda.is_available():
            raise RuntimeError("GraphedSampler needs a CUDA device")
        self.device = ops.canonical_device(kwargs.pop("device", None) or next(denoiser.parameters()).device)
        if self.device.type != "cuda":
            raise ValueError(f"denoiser: expected a network on a CUDA device for graph capture, got {self.device}")
        if "class_labels" in kwargs:
            raise ValueError("class_labels: pass the labels to each call (sampler(seeds, class_labels)), "
                             "not to the constructor")
        self.batch = batch
        self.seeds = torch.zeros(batch, dtype=torch.int64, device=self.device)
        label_dim = getattr(denoiser, "label_dim", 0)
        self.labels = torch.zeros(batch, label_dim, device=self.device) if label_dim else None
        run = lambda: sampler(denoiser, self.seeds, device=self.device, class_labels=self.labels, **kwargs)  # noqa
        prev = ops.set_value_checks(False)  # their reads would sync (and are skipped during capture anyway)
        try:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # compile / autotune / allocate outside the capture
                for _ in range(warmup):
                    run()
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = run()
        finally:
            ops.set_value_checks(prev)

    def __call__(self, seeds, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        seeds = solvers.as_seeds(seeds)
        if seeds.numel() != self.batch:
            raise ValueError(f"seeds: the graph was captured for {self.batch} images, got {seeds.numel()}")
        if (class_labels is None) != (self.labels is None):
            raise ValueError("class_labels: expected labels [batch, label_dim] for this conditional network"
                             if self.labels is not None else "class_labels: this network is unconditional")
        if class_labels is not None and (tuple(class_labels.shape) != tuple(self.labels.shape)
                                         or not class_labels.is_floating_point()):
            raise ValueError(f"class_labels: expected a float tensor of shape {tuple(self.labels.shape)} (as the "
                             f"eager samplers take), got {class_labels.dtype} {tuple(class_labels.shape)}")
        # every check above, before anything is copied into the graph's buffers
        self.seeds.copy_(seeds.pin_memory() if seeds.device.type == "cpu" else seeds, non_blocking=True)
        if class_labels is not None:
            self.labels.copy_(class_labels, non_blocking=True)
        self.graph.replay()
        return self.out.clone()
