"""Training-free ODE/SDE solvers for EDM-family models (every preconditioning, FDM included), each step
one call of the fused ``ops.multistep`` (docs/design.md 1.4, 2.1), with classifier-free guidance and
autoguidance fused into the same call.

All of them integrate EDM's probability-flow ODE in sigma, dx/dsigma = (x - D(x; sigma)) / sigma (the
SDE variant adds noise), over ``schedules.time_steps`` (``schedule``: edm, logsnr or time), ending
with a step to sigma = 0 (dpm3s: a final denoising at sigma_min). NFE (network evaluations per
image, ``nfe(solver, steps)``):

    euler         steps            first order
    heun          2 steps - 1      EDM's second-order sampler (deterministic)
    dpm++2m       steps            DPM-Solver++(2M), Lu et al. 2022, Algorithm 2
    dpm++3m       steps            third-order multistep exponential integrator in log sigma (below)
                                   (dpm++3m and unipc lower their order on the last steps of runs of
                                   fewer than 15 steps, as DPM-Solver's and UniPC's code do)
    dpm++2m-sde   steps            DPM-Solver++(2M) SDE (midpoint form, eta = 1), noise from the contract
    ipndm         steps            iPNDM: 4th-order Adams-Bashforth in sigma with warm-up orders
    unipc         steps            UniPC (Zhao et al. 2023), bh2, order 3 with the UniC corrector
    dpm3s         steps            the official FDM code's DPM-Solver: DPM-Solver++ singlestep order 3
                                   (Lu et al. 2022), outer steps of 3 evaluations (r = 0, 1/3, 2/3), the
                                   last of order 2 or 1 (DPM-Solver's plan), to sigma_min, then D there:
                                   NFE = steps (>= 2); the official uses --schedule logsnr

``afs=True`` (the analytic first step, ``analytic_first_D``) spends one NFE fewer with any solver.

With guidance (``guidance=w``), each evaluation combines a main and a guiding network output,
D = D_guide + w (D_main - D_guide): classifier-free guidance (the guide is the same network with the
label dropped, zeros, evaluated in the same batched call) or autoguidance (Karras et al. 2024: the
guide is another, weaker network of the same task, ``guide=``). w = 1 is unguided. Guidance costs
one more network evaluation per NFE (batched for CFG).

The multistep solvers' last step, to sigma = 0, returns the denoised estimate D (the exponential
integrator's exact step with D constant; iPNDM keeps its Adams-Bashforth step, as published).
Every update is a host-computed linear combination, so a whole run is capturable in a CUDA graph
(``sampling.GraphedSampler(net, batch, sampler=solvers.sample, solver=...)``).

On DPM-Solver++(3M): the third-order update here is the exact integral of the quadratic through the
last three denoised outputs in lambda = -log sigma,

    x_next = e^{-h} x + sum_j w_j D_j,  w_j = int_0^h e^{tau - h} L_j(tau) dtau  (L_j: Lagrange basis),

which in the published form's notation (phi_2 = phi_1/h + 1, phi_3 = phi_2/h - 1/2,
D2 = (D1_0 - D1_1)/(r0 + r1)) is ``x + phi_2 D1 - 2 phi_3 D2``. The commonly published update uses
``- phi_3 D2``, half of that term; on a test problem with exact history it measures order < 2.3,
this one 3 (tests/test_solvers.py::test_published_third_order_form_is_second_order_and_ours_third).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from . import ops
from .schedules import SCHEDULES, time_steps

SOLVERS = ("euler", "heun", "dpm++2m", "dpm++3m", "dpm++2m-sde", "ipndm", "unipc", "dpm3s")

# Adams-Bashforth weights of orders 1-4 for equal steps, newest slope first.
ADAMS_BASHFORTH = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                   4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def nfe(solver: str, steps: int, afs: bool = False) -> int:
    """Network evaluations per image (per branch with guidance) of ``solver`` with ``steps`` steps; ``afs``
    (the analytic first step) saves one."""
    _check_solver(solver)
    return (2 * steps - 1 if solver == "heun" else steps) - bool(afs)


def _check_solver(solver):
    if solver not in SOLVERS:
        raise ValueError(f"solver: expected one of {', '.join(SOLVERS)}, got {solver!r}")


ORDERS = {"dpm++2m": (2,), "dpm++2m-sde": (2,), "dpm++3m": (2, 3), "ipndm": (1, 2, 3, 4), "unipc": (1, 2, 3)}


def check_options(solver: str, steps: int, schedule: str = "edm", order: Optional[int] = None,
                  afs: bool = False) -> None:
    """ValueError naming the option when ``sample`` would refuse these settings (checked before any work)."""
    _check_solver(solver)
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps: expected an integer >= 1, got {steps!r}")
    if solver == "dpm3s" and steps < 2:
        raise ValueError(f"steps: dpm3s needs at least 2 (one solver step and the final denoising), got {steps}")
    if afs and nfe(solver, steps) < 2:
        raise ValueError(f"steps: the analytic first step leaves {solver} with {steps} step(s) no network "
                         "evaluation; give more steps")
    if order is not None:
        allowed = ORDERS.get(solver, ())
        if order not in allowed:
            raise ValueError(f"order: {solver} takes order {', '.join(map(str, allowed))}, got {order}" if allowed
                             else f"order: {solver} has no order option, got {order}")


def as_seeds(seeds, device=None) -> torch.Tensor:
    """``seeds`` (a sequence or tensor of integers) as an int64 vector on ``device`` (None: where they are).
    ValueError, naming ``seeds``, for none or for values that are not integers (no silent truncation of
    0.5 to 0). Reads no tensor values, so a sampler under CUDA-graph capture can call it."""
    t = torch.as_tensor(seeds, device=device)
    if t.numel() == 0:
        raise ValueError("seeds: expected at least one seed, got none")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"seeds: expected integers, got {t.dtype}")
    return t.to(torch.int64).reshape(-1)


def check_class_labels(denoiser, class_labels, B: int) -> None:
    """ValueError, naming ``class_labels``, unless they are None or a float tensor [B, label_dim] of a
    class-conditional ``denoiser`` (None on a conditional network is EDM's all-zero label: unconditional).
    A denoiser without ``label_dim`` takes whatever its ``raw`` takes."""
    label_dim = getattr(denoiser, "label_dim", None)
    if class_labels is None or label_dim is None:
        return
    if not label_dim:
        raise ValueError("class_labels: this network is unconditional (label_dim 0); pass None")
    got = (f"{class_labels.dtype} {list(class_labels.shape)}" if isinstance(class_labels, torch.Tensor)
           else type(class_labels).__name__)
    if not (isinstance(class_labels, torch.Tensor) and class_labels.is_floating_point()
            and tuple(class_labels.shape) == (B, label_dim)):
        raise ValueError(f"class_labels: expected a float tensor [{B}, {label_dim}] (one one-hot row per seed; "
                         f"sampling.seed_labels makes them), got {got}")


class _Net:
    """The network side of a run: the main (and guiding) outputs F (and G) for a net input."""

    def __init__(self, denoiser, guidance, guide, class_labels, B, device, afs=False):
        self.afs = bool(afs)  # the first evaluation is the analytic one (analytic_first_D), then the network
        if not isinstance(guidance, (int, float)) or isinstance(guidance, bool) or not math.isfinite(guidance):
            raise ValueError(f"guidance: expected a finite number (1 = unguided), got {guidance!r}")
        self.net, self.w, self.guide, self.labels, self.B, self.device = denoiser, float(guidance), guide, \
            class_labels, B, device
        self.precond = denoiser.precond
        self.mode = "none" if self.w == 1.0 and guide is None else ("auto" if guide is not None else "cfg")
        if self.mode == "cfg":
            if not getattr(denoiser, "label_dim", 0):
                raise ValueError("guidance: classifier-free guidance needs a class-conditional network (this one has "
                                 "no labels); pass guide= (autoguidance) to guide an unconditional one")
            if class_labels is None:
                raise ValueError("class_labels: classifier-free guidance needs the labels to guide towards")
            self.cat_labels = torch.cat([class_labels, torch.zeros_like(class_labels)])
        if guide is not None:
            if guide.precond.kernel_spec() != denoiser.precond.kernel_spec():
                raise ValueError("guide: expected a network with the main network's preconditioning "
                                 f"({denoiser.precond.name}), got {guide.precond.name}")
            if (guide.img_channels, guide.img_resolution) != (denoiser.img_channels, denoiser.img_resolution):
                raise ValueError("guide: expected a network of the main network's image shape")

    def __call__(self, net_in, s: float, x=None):
        if self.afs:  # F with c_skip x + c_out F = the analytic D (both branches alike: guidance moves nothing)
            self.afs = False
            c_skip, c_out, _, _ = (float(v) for v in self.precond.coefficients(torch.tensor(s, dtype=torch.float64)))
            F = ((analytic_first_D(self.precond, s) - c_skip) / c_out) * x
            return F, (F if self.mode != "none" else None)
        sig = torch.full((self.B,), s, device=self.device)
        if self.mode == "cfg":  # both branches in one batched call
            both = self.net.raw(torch.cat([net_in, net_in]), torch.cat([sig, sig]), self.cat_labels)
            return both[: self.B], both[self.B:]
        F = self.net.raw(net_in, sig, self.labels)
        if self.mode == "auto":
            return F, self.guide.raw(net_in, sig, self.labels)
        return F, None

    def d_kw(self, p, s: float) -> dict:
        """The D part of ops.multistep's arguments at sigma = s: D = c_skip x + c_out (w F + (1 - w) G)."""
        c_skip, c_out, _, _ = (float(v) for v in p.coefficients(torch.tensor(s, dtype=torch.float64)))
        if self.mode == "none":
            return dict(c_skip=c_skip, c_out=c_out)
        return dict(c_skip=c_skip, c_out=self.w * c_out, w_G=(1 - self.w) * c_out)


def analytic_first_D(p, s: float) -> float:
    """AFS (the analytic first step, as zju-pi/diff-sampler's solvers offer it): at the first, highest noise
    level the denoiser is taken as the posterior mean of zero-mean Gaussian data of the preconditioning's
    sigma_data (0.5, EDM's, where it has none), D = k x with k = sigma_data^2 / (sigma_data^2 + s^2), in
    place of a network evaluation (one NFE less). At sigma 80 the image is almost all noise and k is
    4e-5; diff-sampler's own formula, D = x (1 - s / sqrt(1 + s^2)), is the same idea for unit-variance
    data. For N(0, sigma_data^2) data this D is exact (tests/test_solvers.py)."""
    sd = float(getattr(p, "sigma_data", 0.5))
    return sd * sd / (sd * sd + s * s)


def _c_in(p, s: float) -> float:
    return float(p.c_in(torch.tensor(s, dtype=torch.float64))) if s > 0 else 0.0


# ----------------------------------------------------------------------------------------------
# Coefficients (host floats, float64), each solver's own, checked against independent forms in tests.


def exp_multistep_weights(h: float, nodes: Sequence[float]) -> list[float]:
    """Weights w_j with  int_0^h e^{tau - h} P(tau) dtau = sum_j w_j P(nodes[j])  for every polynomial P
    of degree < len(nodes): the exact integral of the interpolant through the denoised outputs at
    ``nodes`` (tau = lambda - lambda_i, so 0 for the newest, negative for older ones)."""
    k = len(nodes)
    M = [-math.expm1(-h)]  # M_m = int_0^h e^{tau - h} tau^m dtau = h^m - m M_{m-1}
    for m in range(1, k):
        M.append(h**m - m * M[-1])
    V = torch.tensor([[t**m for t in nodes] for m in range(k)], dtype=torch.float64)  # V w = M
    return torch.linalg.solve(V, torch.tensor(M, dtype=torch.float64)).tolist()


def unipc_coefficients(h: float, rks: Sequence[float], order: int, B_h: float):
    """UniPC (bh variants) in data prediction: (rhos_p, rhos_c) for a step of size h whose earlier
    denoised outputs sit at rks (in units of h, negative; the newest, at 0, is not listed) and rks+[1]."""
    hh = -h
    rk = list(rks) + [1.0]
    h_phi_k, fact = math.expm1(hh) / hh - 1, 1
    R, b = [], []
    for i in range(1, order + 1):
        R.append([r ** (i - 1) for r in rk])
        b.append(h_phi_k * fact / B_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    R_t, b_t = torch.tensor(R, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    if order == 1:
        rhos_p = []
    elif order == 2:
        rhos_p = [0.5]
    else:
        rhos_p = torch.linalg.solve(R_t[:-1, :-1], b_t[:-1]).tolist()
    rhos_c = [0.5] if order == 1 else torch.linalg.solve(R_t, b_t).tolist()
    return rhos_p, rhos_c


# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def sample(denoiser, seeds: Union[Sequence[int], torch.Tensor], *, solver: str = "heun", steps: int = 18,
           schedule: str = "edm", sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
           order: Optional[int] = None, guidance: float = 1.0, guide=None,
           class_labels: Optional[torch.Tensor] = None, net_dtype: torch.dtype = torch.float32, device=None,
           backend: Optional[str] = None, num_steps: Optional[int] = None,
           state_dtype: torch.dtype = torch.float32, afs: bool = False) -> torch.Tensor:
    """Images [len(seeds), C, H, W] (float32) from ``denoiser`` with ``solver`` over ``steps`` steps of
    ``schedule`` (see the module doc). ``order``: the multistep order (dpm++: 2 or 3 by name; ipndm 1-4,
    default 4; unipc 1-3, default 3). ``guidance`` / ``guide``: classifier-free guidance or
    autoguidance. ``backend`` picks ops.multistep's backend (default: triton, then cuda, on CUDA; cpu on CPU).
    Initial noise: the contract's at (seed, 0), as edm_sampler's, so every solver starts from the
    same latents for the same seeds. ``state_dtype=torch.float64`` (with ``backend="torch"`` and
    ``net_dtype=torch.float64``) runs the same steps in float64: a reference, not a fast path.
    ``afs=True``: the analytic first step (``analytic_first_D``) in place of the first network evaluation,
    so NFE is ``nfe(solver, steps, afs=True)``, one less."""
    steps = num_steps if num_steps is not None else steps  # GraphedSampler passes num_steps
    check_options(solver, steps, schedule, order, afs)
    if device is None:  # the network's device (a parameterless denoiser: the CPU)
        device = next((q.device for q in denoiser.parameters()), torch.device("cpu"))
    device = ops.canonical_device(device)
    seeds = as_seeds(seeds, device)
    B = seeds.numel()
    check_class_labels(denoiser, class_labels, B)
    shape = (B, denoiser.img_channels, denoiser.img_resolution, denoiser.img_resolution)
    p = denoiser.precond
    # dpm3s: K + 1 nonzero outer levels (sigma_max .. sigma_min) for its K outer steps; the others: steps + 1
    # levels ending at 0
    n_levels = len(dpm3s_orders(steps - 1)) + 1 if solver == "dpm3s" else steps
    t = [float(v) for v in time_steps(n_levels, schedule, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                                      precond=p)]
    net = _Net(denoiser, guidance, guide, class_labels, B, device, afs=afs)
    kw = dict(net_dtype=net_dtype, backend=backend)
    if state_dtype not in (torch.float32, torch.float64) or (state_dtype == torch.float64 and backend != "torch"):
        raise ValueError(f"state_dtype: expected torch.float32, or torch.float64 with backend='torch', "
                         f"got {state_dtype}")
    x = t[0] * ops.randn(shape, seed=seeds, offset=0, device=device, backend=backend).to(state_dtype)
    # the network input for sigma_0: a multistep call with no output terms but c_in
    _, net_in, _ = ops.multistep(x, c_in_next=_c_in(p, t[0]), **kw)
    if solver == "dpm3s":
        return _dpm3s(x, net_in, t[:-1], dpm3s_orders(steps - 1), p, net, kw)
    run = dict(euler=_euler, heun=_heun, ipndm=_ipndm, unipc=_unipc)
    if solver.startswith("dpm++"):
        return _dpm(solver, x, net_in, t, p, net, seeds, order, kw)
    return run[solver](x, net_in, t, p, net, order, kw)


def _step(net, p, x, net_in, s, **kw):
    """ops.multistep with this step's network output(s) and D coefficients at sigma = s."""
    F, G = net(net_in, s, x)
    return ops.multistep(x, F, G=G, **net.d_kw(p, s), **kw)


LOWER_ORDER_FINAL_BELOW = 15


def _final_order(i: int, n: int) -> int:
    """DPM-Solver's and UniPC's "lower order final" for short runs (n < 15 steps): the step into the
    last nonzero sigma is first order, the one before second order. EDM's schedule makes those steps
    long in log sigma (0.17 -> 0.002 at 5 steps), where extrapolating a quadratic is unstable."""
    return n - 1 - i if n < LOWER_ORDER_FINAL_BELOW else n


def _euler(x, net_in, t, p, net, order, kw):
    for i in range(len(t) - 1):
        s, sn = t[i], t[i + 1]
        x, net_in, _ = _step(net, p, x, net_in, s, a=sn / s, b=1 - sn / s, c_in_next=_c_in(p, sn), **kw)
    return x


def _heun(x, net_in, t, p, net, order, kw):
    """EDM's deterministic Heun: an Euler step, then (except to sigma = 0) the trapezoid correction."""
    n = len(t) - 1
    for i in range(n):
        s, sn = t[i], t[i + 1]
        dt = sn - s
        # Euler point and its slope d = (x - D) / s, kept for the correction
        x_eul, net_in_eul, d = _step(net, p, x, net_in, s, a=sn / s, b=1 - sn / s, c_in_next=_c_in(p, sn),
                                     keep=(1 / s, -1 / s), **kw)
        if i == n - 1:
            return x_eul
        # x_next = x + dt/2 (d + (x_eul - D2)/sn)
        x, net_in, _ = _step(net, p, x_eul, net_in_eul, sn, a=dt / (2 * sn), b=-dt / (2 * sn), history=[x, d],
                             h=[1.0, dt / 2], c_in_next=_c_in(p, sn), **kw)
    return x


def _dpm(solver, x, net_in, t, p, net, seeds, order, kw):
    sde = solver == "dpm++2m-sde"
    order = order or (3 if solver == "dpm++3m" else 2)
    stride = (math.prod(x.shape[1:]) + 3) // 4  # counters one image's noise uses (edm_sampler's layout)
    Ds: list = []  # newest first
    lam = [-math.log(s) if s > 0 else math.inf for s in t]
    for i in range(len(t) - 1):
        s, sn = t[i], t[i + 1]
        if sn == 0:  # to sigma = 0: the denoised estimate
            x, _, _ = _step(net, p, x, net_in, s, a=0.0, b=1.0, **kw)
            return x
        h = lam[i + 1] - lam[i]
        step = dict(c_in_next=_c_in(p, sn), keep=(0.0, 1.0), **kw)
        if solver == "dpm++2m" or sde:
            if sde:  # eta = 1: x = (sn/s) e^{-h} x + (1 - e^{-2h}) D' + sn sqrt(1 - e^{-2h}) n
                a, c = sn / s * math.exp(-h), -math.expm1(-2 * h)
            else:
                a, c = sn / s, -math.expm1(-h)
            if Ds:
                r = (lam[i] - lam[i - 1]) / h
                b, hist, hc = c * (1 + 1 / (2 * r)), Ds[:1], [-c / (2 * r)]
            else:
                b, hist, hc = c, [], []
            noise = dict(noise_scale=sn * math.sqrt(-math.expm1(-2 * h)), seed=seeds, offset=(i + 1) * stride) \
                if sde else {}
            x, net_in, D = _step(net, p, x, net_in, s, a=a, b=b, history=hist, h=hc, **noise, **step)
        else:
            k = min(order, len(Ds) + 1, _final_order(i, len(t) - 1))
            nodes = [0.0] + [lam[i - j] - lam[i] for j in range(1, k)]
            w = exp_multistep_weights(h, nodes)
            x, net_in, D = _step(net, p, x, net_in, s, a=sn / s, b=w[0], history=Ds[: k - 1], h=w[1:], **step)
        Ds = [D, *Ds][: order - 1]
    return x


def _ipndm(x, net_in, t, p, net, order, kw):
    order = order or 4
    slopes: list = []  # newest first
    for i in range(len(t) - 1):
        s, sn = t[i], t[i + 1]
        w = ADAMS_BASHFORTH[min(order, len(slopes) + 1)]
        dt = sn - s
        # x_next = x + dt (w0 (x - D)/s + sum_j w_j d_j); keep this step's slope (x - D)/s
        x, net_in, d = _step(net, p, x, net_in, s, a=1 + dt * w[0] / s, b=-dt * w[0] / s, history=slopes[: len(w) - 1],
                             h=[dt * wj for wj in w[1:]], c_in_next=_c_in(p, sn), keep=(1 / s, -1 / s), **kw)
        slopes = [d, *slopes][: order - 1]
    return x


def _unipc(x, net_in, t, p, net, order, kw):
    """UniPC-p (bh2) in data prediction: after each evaluation the UniC corrector refines the state the
    network just saw (x_c), then the UniP predictor steps from x_c with the same evaluation; no
    corrector after the last evaluation (it would need one more)."""
    order = order or 3
    lam = [-math.log(s) if s > 0 else math.inf for s in t]
    Ds: list = []  # denoised outputs, newest first
    x_prev = None  # the corrected state the last predictor started from
    prev = None  # (h, rks, order) of the step that produced x
    for i in range(len(t) - 1):
        s, sn = t[i], t[i + 1]
        F, G = net(net_in, s, x)
        dk = net.d_kw(p, s)
        # UniC: x_c = (s/s_prev) x_prev - expm1(-h) D_prev - B_h (sum rho_c D1s + rho_last (D - D_prev))
        if prev is not None:
            h0, rks0, k0 = prev
            B_h = math.expm1(-h0)
            _, rc = unipc_coefficients(h0, rks0, k0, B_h)
            Dp = Ds[0]
            # D1_j = (D_{j} - D_prev) / rk_j for the older outputs (Ds[1:]), D1_t = D - D_prev
            coefD = -B_h * rc[-1]
            coefDp = -math.expm1(-h0) + B_h * rc[-1]
            hist, hc = [x_prev, Dp], [s / t[i - 1], coefDp]
            for j, rk in enumerate(rks0):
                hc[1] += B_h * rc[j] / rk
                hist.append(Ds[1 + j])
                hc.append(-B_h * rc[j] / rk)
            x, _, D = ops.multistep(x, F, G=G, **dk, a=0.0, b=coefD, history=hist, h=hc, keep=(0.0, 1.0), **kw)
        else:
            _, _, D = ops.multistep(x, F, G=G, **dk, a=1.0, keep=(0.0, 1.0), **kw)
        if sn == 0:
            return D
        h = lam[i + 1] - lam[i]
        k = min(order, len(Ds) + 1, _final_order(i, len(t) - 1))
        rks = [(lam[i - j] - lam[i]) / h for j in range(1, k)]
        B_h = math.expm1(-h)
        rp, _ = unipc_coefficients(h, rks, k, B_h)
        # UniP: x_next = (sn/s) x_c - expm1(-h) D - B_h sum_j rho_p[j] (D_j - D) / rk_j
        older = [D, *Ds][1:k]
        cD = -math.expm1(-h) + B_h * sum(rp[j] / rks[j] for j in range(k - 1))
        hist, hc = [D, *older], [cD, *[-B_h * rp[j] / rks[j] for j in range(k - 1)]]
        x_prev = x
        x, net_in, _ = ops.multistep(x, a=sn / s, history=hist, h=hc, c_in_next=_c_in(p, sn), **kw)
        Ds = [D, *Ds][: max(order, 1)]
        prev = (h, rks, k)
    return x


def dpm3s_orders(steps: int) -> list[int]:
    """The orders of DPM-Solver's singlestep_fixed for ``steps`` evaluations with order 3: threes, then
    a 2 and a 1, a 1, or a 2 (summing to ``steps``)."""
    if steps < 3:
        return [1] * steps
    K = steps // 3 + 1
    if steps % 3 == 0:
        return [3] * (K - 2) + [2, 1]
    return [3] * (K - 1) + [steps % 3]


def _dpm3s(x, net_in, outer, orders, p, net, kw):
    """The official FDM code's DPM-Solver (its generate.py ``--solver dpm``): DPM-Solver++ singlestep,
    order 3, in data prediction with alpha = 1 (EDM's sigma), outer steps uniform in ``schedule``
    (the official: logSNR), then the denoised estimate at sigma_min (``denoise_to_zero``): steps - 1
    evaluations in the solver and one at the end, so NFE = steps. With h = lambda_t - lambda_s,
    phi_1 = expm1(-h), phi_2 = phi_1 / h + 1, r1 = 1/3, r2 = 2/3, phi_1k = expm1(-r_k h),
    phi_22 = expm1(-r2 h) / (r2 h) + 1:

        order 1: x_t  = (s_t/s) x - phi_1 D_s
        order 2: x_s1 = (s_1/s) x - phi_11 D_s   (r1 = 1/2)
                 x_t  = (s_t/s) x - phi_1 D_s - (1/(2 r1)) phi_1 (D_s1 - D_s)
        order 3: x_s1 = (s_1/s) x - phi_11 D_s
                 x_s2 = (s_2/s) x - phi_12 D_s + (r2/r1) phi_22 (D_s1 - D_s)
                 x_t  = (s_t/s) x - phi_1 D_s + (1/r2) phi_2 (D_s2 - D_s)"""

    def ev(xk, net_in, sig, nxt, **k):
        """D at (xk, sig) into the update; also the net input for sigma ``nxt``."""
        F, G = net(net_in, sig, xk)
        return ops.multistep(xk, F, G=G, **net.d_kw(p, sig), **k, c_in_next=_c_in(p, nxt), **kw)

    for k, order in enumerate(orders):
        s, tn = outer[k], outer[k + 1]
        h = math.log(s) - math.log(tn)
        sig_at = lambda r: s * math.exp(-r * h)  # noqa: E731
        phi_1 = math.expm1(-h)
        if order == 1:
            x, net_in, _ = ev(x, net_in, s, tn, a=tn / s, b=-phi_1)
            continue
        r1 = 0.5 if order == 2 else 1 / 3
        s1 = sig_at(r1)
        x_s1, net_s1, D_s = ev(x, net_in, s, s1, a=s1 / s, b=-math.expm1(-r1 * h), keep=(0.0, 1.0))
        if order == 2:
            c = phi_1 / (2 * r1)
            x, net_in, _ = ev(x_s1, net_s1, s1, tn, a=0.0, b=-c, history=[x, D_s], h=[tn / s, -phi_1 + c])
            continue
        r2 = 2 / 3
        s2 = sig_at(r2)
        c2 = r2 / r1 * (math.expm1(-r2 * h) / (r2 * h) + 1)
        x_s2, net_s2, _ = ev(x_s1, net_s1, s1, s2, a=0.0, b=c2, history=[x, D_s],
                             h=[s2 / s, -math.expm1(-r2 * h) - c2])
        c3 = (phi_1 / h + 1) / r2
        x, net_in, _ = ev(x_s2, net_s2, s2, tn, a=0.0, b=c3, history=[x, D_s], h=[tn / s, -phi_1 - c3])
    x, _, _ = ev(x, net_in, outer[-1], outer[-1], a=0.0, b=1.0)  # denoise_to_zero: D at sigma_min
    return x
