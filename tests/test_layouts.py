"""The layout rule (fdm_fast/ops/_validate.py): every op, every backend, inputs of any strides.

Property-style: each case draws, from its own seed, an op, a preconditioning, a shape (2-D to 5-D,
odd sizes, batch 1..3, one-channel images), and for every tensor argument its own layout: contiguous,
channels_last, a slice along C / H / W (step 2 or an offset window), permuted strides, a batch
expanded from one sample, and arbitrary strides on size-1 dims (a [B, 1, H, W] tensor with
channels_last strides is the classic). Arguments of one call get different layouts. Every output is
compared with the float64 reference computed from contiguous copies of the same values (the bound
of conftest.assert_close), and the outputs come back in the first argument's layout (contiguous
when that one is neither). On today's main before this rule, the Triton backend gave errors of
about 5.7 on a channel slice and the compiled backends raised on a one-channel channels_last F.
"""

import random

import pytest
import torch

from conftest import DEVICE, HAS_CPU_EXT, HAS_TRITON, assert_close
from fdm_fast import ops, schedules

BACKENDS = ["torch"] + (["triton"] if HAS_TRITON else []) + (["cpu" if DEVICE.type == "cpu" else "cuda"]
                                                               if HAS_CPU_EXT else [])
OPS = ["perturb", "perturb_noise", "loss", "loss_noise", "churn", "euler", "heun", "heun_churn", "multistep"]
CASES = 12  # per (op, backend); FDM_FAST_LAYOUT_CASES raises it for a longer hunt
NOISE_ATOL = 1e-6  # per unit sigma: backends round Box-Muller's log/sin/cos differently (test_ops.py)


def _shape(r: random.Random):
    B = r.choice([1, 2, 3])
    kind = r.choice(["4d", "4d", "4d", "4d1", "3d", "5d", "2d"])
    if kind == "4d":
        return (B, r.choice([2, 3, 4]), r.randint(3, 9), r.randint(3, 9))
    if kind == "4d1":
        return (B, 1, r.randint(3, 9), r.randint(3, 9))
    if kind == "3d":
        return (B, r.randint(2, 5), r.randint(3, 11))
    if kind == "5d":
        return (B, 2, r.randint(2, 3), r.randint(2, 4), r.randint(2, 4))
    return (B, r.randint(1, 40))


LAYOUTS = ["contiguous", "channels_last", "step2", "window", "permuted", "expanded", "size1_strides"]


def realise(v: torch.Tensor, layout: str, r: random.Random) -> torch.Tensor:
    """A tensor with the values of ``v`` (expanded: of its first sample) in the named memory layout."""
    v = v.to(DEVICE)
    dev = dict(dtype=v.dtype, device=DEVICE)
    shape, d = tuple(v.shape), r.randrange(1, v.dim()) if v.dim() > 1 else 0
    if layout == "channels_last" and v.dim() == 4:
        return v.contiguous(memory_format=torch.channels_last)
    if layout == "step2":  # every other index of a twice-as-large dim (e.g. a strided view)
        big = list(shape)
        big[d] *= 2
        t = torch.randn(big, **dev).narrow(d, 0, 2 * shape[d])[(slice(None),) * d + (slice(None, None, 2),)]
        return t.copy_(v)
    if layout == "window":  # an offset window of a larger dim (the mean half of a learned-variance output)
        big = list(shape)
        big[d] += 3
        return torch.randn(big, **dev).narrow(d, 1 + r.randrange(2), shape[d]).copy_(v)
    if layout == "permuted":
        perm = list(range(v.dim()))
        r.shuffle(perm)
        inv = [perm.index(i) for i in range(v.dim())]
        return torch.empty([shape[p] for p in perm], **dev).permute(inv).copy_(v)
    if layout == "expanded":
        return v[:1].expand(shape)
    if layout == "size1_strides":
        base = v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 and r.random() < 0.5 else v.contiguous()
        strides = [s if n != 1 else r.choice([1, 7, 1000]) for s, n in zip(base.stride(), shape)]
        return torch.empty_strided(shape, strides, **dev).copy_(v) if 1 in shape else base
    return v.contiguous()


def _layout_of(t):
    return "channels_last" if t.dim() == 4 and not t.is_contiguous() and \
        t.is_contiguous(memory_format=torch.channels_last) else "contiguous"


def _expect_layout(name, out, first):
    want = _layout_of(first) if (first.is_contiguous() or _layout_of(first) == "channels_last") else "contiguous"
    got_ok = out.is_contiguous(memory_format=torch.channels_last if want == "channels_last" else torch.contiguous_format)
    assert got_ok, f"{name}: expected an output in the {want} layout of the first argument, got strides {out.stride()}"


def _sigmas(p, B, g):
    u = torch.rand(B, generator=g, dtype=torch.float64)
    return (p.sigma_min * (p.sigma_max / p.sigma_min) ** u).float().to(DEVICE)


def _f64(t):
    return None if t is None else t.detach().to(torch.float64).contiguous()


def _run_case(op: str, backend: str, case: int):
    r = random.Random(f"{op}/{backend}/{case}")
    g = torch.Generator().manual_seed(r.randrange(2**31))
    p = schedules.get_precond(r.choice(schedules.PRECONDS))
    shape = _shape(r)
    B = shape[0]
    pick = lambda: r.choice(LAYOUTS)  # noqa: E731
    net_dt = r.choice([torch.float32, torch.float32, torch.bfloat16])
    seed = r.choice([r.randrange(2**40), torch.tensor([r.randrange(2**40) for _ in range(B)], dtype=torch.int64,
                                                                          device=DEVICE)])
    off = r.randrange(2**20)
    kw = dict(seed=seed, offset=off)
    ctx = f"{op} on {backend}: precond {p.name}, shape {shape}"

    def arg(dtype=torch.float32, scale=1.0):
        lay = pick()
        return realise((torch.randn(shape, generator=g) * scale).to(dtype), lay, r), lay

    if op.startswith("perturb"):
        (y, ly), s = arg(net_dt), _sigmas(p, B, g)
        noise, ln = arg() if op.endswith("noise") else (None, None)
        out, x = ops.perturb(y, s, p, noise=noise, out_dtype=net_dt, return_x=True, backend=backend, **kw)
        ref, xref = ops.perturb(_f64(y), s.double(), p, noise=_f64(noise), out_dtype=torch.float64, return_x=True,
                                backend="torch", **kw)
        eag, _ = ops.perturb(y.contiguous(), s, p, noise=noise, out_dtype=net_dt, return_x=True, backend="torch", **kw)
        tol = NOISE_ATOL * s.double() * p.c_in(s.double()).abs()
        assert_close(f"{ctx}, layouts y={ly} noise={ln}: net_in", out, ref, eag, dtype=net_dt, floor_ulps=64,
                     extra_atol=tol)
        assert_close(f"{ctx}: x", x, xref, None, dtype=torch.float32, extra_atol=NOISE_ATOL * s.double() + 1e-6)
        _expect_layout(ctx, out, y)
    elif op.startswith("loss"):
        (F, lf), (y, ly), s = arg(net_dt), arg(net_dt), _sigmas(p, B, g)
        noise, ln = arg() if op.endswith("noise") else (None, None)
        F = F.detach().requires_grad_(True) if F._base is None else F.requires_grad_(True)
        loss = ops.denoise_loss(F, y, s, p, noise=noise, reduction="none", backend=backend, **kw)
        grad = torch.rand(B, generator=g).to(DEVICE)
        (gF,) = torch.autograd.grad(loss, F, grad)
        F64 = _f64(F).requires_grad_(True)
        ref = ops.denoise_loss(F64, _f64(y), s.double(), p, noise=_f64(noise), reduction="none", backend="torch", **kw)
        (gref,) = torch.autograd.grad(ref, F64, grad.double())
        Fe = F.detach().contiguous().requires_grad_(True)
        eag = ops.denoise_loss(Fe, y.contiguous(), s, p, noise=noise, reduction="none", backend="torch", **kw)
        (geag,) = torch.autograd.grad(eag, Fe, grad)
        # Box-Muller rounding enters D - y through c_skip sigma n (NOISE_ATOL per unit sigma)
        lt = ref.detach().abs() * 1e-5 + 1e-6
        assert_close(f"{ctx}, layouts F={lf} y={ly} noise={ln}: loss", loss.detach()[:, None], ref.detach()[:, None],
                     eag.detach()[:, None], dtype=torch.float32, extra_atol=lt)
        gt = gref.abs().reshape(B, -1).amax(1) * 1e-5
        assert_close(f"{ctx}, layouts F={lf} y={ly}: dL/dF", gF, gref, geag, dtype=net_dt, floor_ulps=8, extra_atol=gt)
        assert gF.shape == F.shape
    else:
        (x, lx), s0 = arg(torch.float32, 3.0), _sigmas(p, B, g)
        if op == "churn":
            th = s0 * (1 + torch.rand(B, generator=g).to(DEVICE))
            noise, ln = arg() if r.random() < 0.3 else (None, None)
            xo, ni = ops.churn(x, s0, th, p, noise=noise, net_dtype=net_dt, backend=backend, **kw)
            xr, nr = ops.churn(_f64(x), s0.double(), th.double(), p, noise=_f64(noise), net_dtype=torch.float64,
                               backend="torch", **kw)
            scale = NOISE_ATOL * (th.double() ** 2 - s0.double() ** 2).sqrt() + 1e-6
            assert_close(f"{ctx}, layouts x={lx} noise={ln}: x_hat", xo, xr, None, dtype=torch.float32,
                         floor_ulps=8, extra_atol=scale)
            assert_close(f"{ctx}: net_in", ni, nr, None, dtype=net_dt, floor_ulps=64,
                         extra_atol=scale * p.c_in(th.double()).abs())
            _expect_layout(ctx, xo, x)
        elif op == "multistep":  # the solvers' step: up to 4 stored tensors, guidance, noise, kept output
            (F, lf), (G, lg) = arg(net_dt), arg(net_dt)
            K = r.randrange(0, 5)
            hs = [arg() for _ in range(K)]
            H = [t for t, _ in hs]
            noisy = r.random() < 0.5
            noise, ln = arg() if noisy and r.random() < 0.3 else (None, None)
            coef = lambda: (torch.rand(B, generator=g).to(DEVICE) - 0.3) if r.random() < 0.5 else r.random() - 0.3  # noqa: E731,E501
            c = dict(c_skip=coef(), c_out=coef(), a=coef(), b=coef(), w_G=coef(), h=[coef() for _ in range(K)],
                     noise_scale=r.random() if noisy else 0.0, c_in_next=coef(), keep=(coef(), coef()))
            out = ops.multistep(x, F, G=G, history=H, noise=noise, net_dtype=net_dt, backend=backend, **c, **kw)
            ref = ops.multistep(_f64(x), _f64(F), G=_f64(G), history=[_f64(t) for t in H], noise=_f64(noise),
                                net_dtype=torch.float64, backend="torch", **c, **kw)
            eag = ops.multistep(x.contiguous(), F.contiguous(), G=G.contiguous(), history=[t.contiguous() for t in H],
                                noise=noise, net_dtype=net_dt, backend="torch", **c, **kw)
            extra = NOISE_ATOL * c["noise_scale"] + 1e-6
            lays = f"layouts x={lx} F={lf} G={lg} H={[la for _, la in hs]} noise={ln}"
            for name, o, w, e, dt in zip(("x_next", "net_in", "kept"), out, ref, eag, (torch.float32, net_dt,
                                                                                    torch.float32)):
                assert_close(f"{ctx}, {lays}: {name}", o, w, e, dtype=dt, floor_ulps=64 if dt != torch.float32 else 8,
                             extra_atol=extra * (1 if name != "net_in" else 4))
            _expect_layout(ctx, out[0], x)
        elif op == "euler":
            (F, lf), tn = arg(net_dt), s0 * torch.rand(B, generator=g).to(DEVICE)
            xo, d, ni = ops.euler_step(x, F, s0, tn, p, net_dtype=net_dt, backend=backend)
            xr, dr, nr = ops.euler_step(_f64(x), _f64(F), s0.double(), tn.double(), p, net_dtype=torch.float64,
                                        backend="torch")
            xe, de, ne = ops.euler_step(x.contiguous(), F.contiguous(), s0, tn, p, net_dtype=net_dt, backend="torch")
            assert_close(f"{ctx}, layouts x={lx} F={lf}: x_next", xo, xr, xe, floor_ulps=8)
            assert_close(f"{ctx}: d", d, dr, de, floor_ulps=8)
            assert_close(f"{ctx}: net_in", ni, nr, ne, dtype=net_dt, floor_ulps=64)
            _expect_layout(ctx, xo, x)
        else:
            (d, ld), (F, lf) = arg(), arg(net_dt)
            tn = s0 * (0.2 + 0.8 * torch.rand(B, generator=g).to(DEVICE))
            churn = op == "heun_churn"
            th = tn * (1 + torch.rand(B, generator=g).to(DEVICE)) if churn else None
            noise, ln = arg() if churn and r.random() < 0.3 else (None, None)
            xo, ni = ops.heun_step(x, d, F, s0, tn, p, t_hat_next=th, noise=noise, net_dtype=net_dt,
                                   backend=backend, **kw)
            xr, nr = ops.heun_step(_f64(x), _f64(d), _f64(F), s0.double(), tn.double(), p,
                                   t_hat_next=None if th is None else th.double(), noise=_f64(noise),
                                   net_dtype=torch.float64, backend="torch", **kw)
            xe, ne = ops.heun_step(x.contiguous(), d.contiguous(), F.contiguous(), s0, tn, p, t_hat_next=th,
                                   noise=noise, net_dtype=net_dt, backend="torch", **kw)
            extra = 0.0 if th is None else NOISE_ATOL * (th.double() ** 2 - tn.double() ** 2).sqrt() + 1e-6
            assert_close(f"{ctx}, layouts x={lx} d={ld} F={lf} noise={ln}: x_next", xo, xr, xe, floor_ulps=8,
                         extra_atol=extra)
            assert_close(f"{ctx}: net_in", ni, nr, ne, dtype=net_dt, floor_ulps=64,
                         extra_atol=extra * (1.0 if th is None else p.c_in(th.double()).abs()))
            _expect_layout(ctx, xo, x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_any_layout_gives_the_reference_answer(poison, op, backend):
    import os

    for case in range(int(os.environ.get("FDM_FAST_LAYOUT_CASES", CASES))):
        _run_case(op, backend, case)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_reported_channel_slice(poison, backend):
    """The issue's reproduction: the mean half of a learned-variance output, y = base[:, :3]."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 6, 8, 8, generator=g).to(DEVICE)
    y = base[:, :3]
    want = ops.perturb(y.contiguous(), 1.5, "fdm_edm", seed=7, backend="torch")
    got = ops.perturb(y, 1.5, "fdm_edm", seed=7, backend=backend)
    assert (got - want).abs().max() < 1e-5
    F = torch.randn(2, 6, 8, 8, generator=g).to(DEVICE)[:, 3:]
    lw = ops.denoise_loss(F.contiguous(), y.contiguous(), 1.5, "fdm_edm", seed=7, reduction="none", backend="torch")
    lg = ops.denoise_loss(F, y, 1.5, "fdm_edm", seed=7, reduction="none", backend=backend)
    torch.testing.assert_close(lg, lw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_channel_channels_last_output_against_contiguous_data(backend):
    """A channels_last [B, 1, H, W] network output with a contiguous y: the same memory order,
    accepted by every backend (the compiled ones used to compare raw strides and raise)."""
    F = torch.empty_strided((4, 1, 16, 16), (256, 1, 16, 1), device=DEVICE).normal_()
    y = torch.randn(4, 1, 16, 16, device=DEVICE)
    got = ops.denoise_loss(F, y, 0.8, "fdm_edm", seed=1, reduction="none", backend=backend)
    want = ops.denoise_loss(F.contiguous(), y, 0.8, "fdm_edm", seed=1, reduction="none", backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
