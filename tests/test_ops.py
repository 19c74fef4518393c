"""Every fused op on every non-reference backend against the float64 reference.

Fresh random inputs for each case, every net-facing dtype, contiguous and channels_last, odd sizes
(batch 1 and 5, 3x17x19) and a size with several programs per sample, outputs poisoned with NaN
before each run. The bound is the flash-attention one (conftest.assert_close): at most twice eager
PyTorch's own error in the same dtype, plus a few ULPs.
"""

import os
import zlib

import pytest
import torch

from conftest import DEVICE, assert_close, requires_cpu_ext, requires_cuda_ext, requires_triton
from fdm_fast import ops, schedules

BACKENDS = [pytest.param("triton", marks=requires_triton),
            pytest.param("cpu" if DEVICE.type == "cpu" else "cuda",
                         marks=requires_cpu_ext if DEVICE.type == "cpu" else requires_cuda_ext)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LAYOUTS = ["contiguous", "channels_last"]
SHAPES = [(1, 3, 17, 19), (5, 3, 17, 19), (2, 3, 32, 32)]
# Backends may round log/sin/cos of Box-Muller differently (measured: <= 5e-7 between the Triton
# interpreter and torch); the noise enters scaled by sigma, so this much is allowed per unit sigma.
NOISE_ATOL = 1e-6


def net_in_ulps(p):
    """ULP floor for c_in * x. FDM's c_in = exp(-mB)(1 + mB) loses about mB ULPs in float32 when mB is
    rounded (mB reaches ~20 at sigma_max with m = 2), so its floor scales with the largest mB."""
    if not p.fdm:
        return 4.0
    return 4.0 + 2.0 * p.fdm_multiplier * (p.fdm_beta_min + 0.5 * p.fdm_beta_d)


def _gen(*key):
    """A generator seeded from the test's parameters: fresh inputs per case, reproducible on failure.

    ``FDM_FAST_TEST_SEED=N`` draws another set of inputs for every case."""
    return torch.Generator().manual_seed(zlib.crc32(repr((os.environ.get("FDM_FAST_TEST_SEED", "0"), key)).encode()))


def _layout(t, layout):
    return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else t.contiguous()


def _sigmas(p, B, g, lo_frac=0.0):
    """Per-sample noise levels, log-uniform over the preconditioning's supported range."""
    lo, hi = p.sigma_min, p.sigma_max
    u = torch.rand(B, generator=g, dtype=torch.float64) * (1 - lo_frac) + lo_frac
    if B > 1:
        u[0] = 1.0  # always cover the top of the range, where FDM's c_in is most sensitive
    return (lo * (hi / lo) ** u).float()


def _rand(shape, g, scale=1.0):
    return torch.randn(shape, generator=g) * scale


def _case(*key):
    backend, name, dtype, layout, shape = key
    return schedules.get_precond(name), _gen(*key), shape[0]


def _dev(t, layout=None, dtype=None):
    t = t.to(DEVICE, dtype=dtype) if dtype is not None else t.to(DEVICE)
    return _layout(t, layout) if layout else t


params = pytest.mark.parametrize
all_cases = [params("backend", BACKENDS), params("name", schedules.PRECONDS), params("dtype", DTYPES),
             params("layout", LAYOUTS), params("shape", SHAPES)]


def cases(f):
    for p in reversed(all_cases):
        f = p(f)
    return f


@cases
def test_perturb(poison, backend, name, dtype, layout, shape):
    p, g, B = _case(backend, name, dtype, layout, shape)
    y = _rand(shape, g)
    sigma = _sigmas(p, B, g)
    seed = int(torch.randint(0, 2**62, (1,), generator=g))
    ref64, x64 = ops.perturb(_dev(y, layout, torch.float64), sigma.double().to(DEVICE), p, seed=seed, offset=3,
                             out_dtype=torch.float64, return_x=True, backend="torch")
    yd = _dev(y, layout, dtype)
    eager, _ = ops.perturb(yd, sigma.to(DEVICE), p, seed=seed, offset=3, return_x=True, backend="torch")
    out, x = ops.perturb(yd, sigma.to(DEVICE), p, seed=seed, offset=3, return_x=True, backend=backend)
    assert out.dtype == dtype and x.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    # The reference gets y in the test dtype too: rounding the data is not the kernel's error.
    ref64, x64 = ops.perturb(_dev(yd.double(), layout), sigma.double().to(DEVICE), p, seed=seed, offset=3,
                             out_dtype=torch.float64, return_x=True, backend="torch")
    assert_close("net_in", out, ref64, eager, floor_ulps=net_in_ulps(p))
    assert_close("x", x, x64, _, dtype=torch.float32, extra_atol=NOISE_ATOL * sigma)


@cases
def test_perturb_explicit_noise(poison, backend, name, dtype, layout, shape):
    p, g, B = _case(backend, name, dtype, layout, shape)
    y, n = _dev(_rand(shape, g), layout, dtype), _dev(_rand(shape, g), layout, dtype)
    sigma = _sigmas(p, B, g).to(DEVICE)
    ref64 = ops.perturb(y.double(), sigma.double(), p, noise=n.double(), out_dtype=torch.float64, backend="torch")
    eager = ops.perturb(y, sigma, p, noise=n, backend="torch")
    out = ops.perturb(y, sigma, p, noise=n, backend=backend)
    assert_close("net_in", out, ref64, eager, floor_ulps=net_in_ulps(p))


def _loss_inputs(key):
    backend, name, dtype, layout, shape = key
    p, g, B = _case(*key)
    y = _dev(_rand(shape, g), layout, dtype)
    F = _dev(_rand(shape, g), layout, dtype)
    sigma = _sigmas(p, B, g).to(DEVICE)
    seed = int(torch.randint(0, 2**62, (1,), generator=g))
    clamp = [None, 37.5][int(torch.randint(0, 2, (1,), generator=g))]
    grad = torch.rand(B, generator=g).to(DEVICE) + 0.5
    return p, y, F, sigma, seed, clamp, grad


@cases
def test_denoise_loss_forward_and_backward(poison, backend, name, dtype, layout, shape):
    p, y, F, sigma, seed, clamp, grad = _loss_inputs((backend, name, dtype, layout, shape))
    kw = dict(seed=seed, offset=11, clamp=clamp, reduction="none")

    def run(F_, y_, s_, be):
        F_ = F_.detach().requires_grad_(True)
        loss = ops.denoise_loss(F_, y_, s_, p, backend=be, **kw)
        loss.backward(grad.to(loss.dtype))
        return loss, F_.grad

    ref_l, ref_g = run(F.double(), y.double(), sigma.double(), "torch")
    eager_l, eager_g = run(F, y, sigma, "torch")
    out_l, out_g = run(F, y, sigma, backend)
    assert out_l.dtype == torch.float32 and out_l.shape == (F.shape[0],)
    assert out_g.dtype == dtype and out_g.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
    assert_close("loss", out_l, ref_l, eager_l, dtype=torch.float32, floor_ulps=64)  # a sum of ~1e3 terms
    assert_close("dL/dF", out_g, ref_g, eager_g)


@cases
def test_churn(poison, backend, name, dtype, layout, shape):
    p, g, B = _case(backend, name, dtype, layout, shape)
    t_cur = _sigmas(p, B, g).to(DEVICE)
    t_hat = t_cur * (1 + 0.4 * torch.rand(B, generator=g)).to(DEVICE)
    x = _dev(_rand(shape, g), layout) * t_cur.reshape(-1, 1, 1, 1)
    seed = int(torch.randint(0, 2**62, (1,), generator=g))
    kw = dict(seed=seed, offset=2, S_noise=1.007)
    ref_x, ref_n = ops.churn(x.double(), t_cur.double(), t_hat.double(), p, net_dtype=torch.float64, backend="torch",
                             **kw)
    eag_x, eag_n = ops.churn(x, t_cur, t_hat, p, net_dtype=dtype, backend="torch", **kw)
    out_x, out_n = ops.churn(x, t_cur, t_hat, p, net_dtype=dtype, backend=backend, **kw)
    assert out_x.dtype == torch.float32 and out_n.dtype == dtype
    noise_atol = NOISE_ATOL * t_hat.cpu()
    assert_close("x_hat", out_x, ref_x, eag_x, extra_atol=noise_atol)
    assert_close("net_in", out_n, ref_n, eag_n, extra_atol=noise_atol * p.c_in(t_hat.cpu()),
                 floor_ulps=net_in_ulps(p))


def _step_inputs(key, final=False):
    backend, name, dtype, layout, shape = key
    p, g, B = _case(*key)
    t_cur = _sigmas(p, B, g, lo_frac=0.05).to(DEVICE)
    t_next = torch.zeros_like(t_cur) if final else t_cur * 0.6
    x = (_dev(_rand(shape, g), layout) * t_cur.reshape(-1, 1, 1, 1)).float()
    F = _dev(_rand(shape, g), layout, dtype)
    return p, g, t_cur, t_next, x, F


@cases
def test_euler_step(poison, backend, name, dtype, layout, shape):
    final = shape[0] == 1  # one of the shapes exercises the last step (t_next = 0)
    p, g, t_cur, t_next, x, F = _step_inputs((backend, name, dtype, layout, shape), final)
    ref = ops.euler_step(x.double(), F.double(), t_cur.double(), t_next.double(), p, net_dtype=torch.float64,
                         backend="torch")
    eager = ops.euler_step(x, F, t_cur, t_next, p, net_dtype=dtype, backend="torch")
    out = ops.euler_step(x, F, t_cur, t_next, p, net_dtype=dtype, backend=backend)
    assert [o.dtype for o in out] == [torch.float32, torch.float32, dtype]
    for label, o, r, e in zip(("x_next", "d", "net_in"), out, ref, eager):
        assert o.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
        assert_close(label, o, r, e, floor_ulps=net_in_ulps(p) if label == "net_in" else 4.0)


@cases
def test_heun_step(poison, backend, name, dtype, layout, shape):
    p, g, t_cur, t_next, x, F = _step_inputs((backend, name, dtype, layout, shape))
    d = _dev(_rand(x.shape, g), layout)
    churning = shape[0] != 1
    extra = {}
    if churning:
        extra = dict(t_hat_next=t_next * 1.2, seed=int(torch.randint(0, 2**62, (1,), generator=g)), offset=77,
                     S_noise=1.003)
    ref = ops.heun_step(x.double(), d.double(), F.double(), t_cur.double(), t_next.double(), p,
                        net_dtype=torch.float64, backend="torch",
                        **{k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in extra.items()})
    eager = ops.heun_step(x, d, F, t_cur, t_next, p, net_dtype=dtype, backend="torch", **extra)
    out = ops.heun_step(x, d, F, t_cur, t_next, p, net_dtype=dtype, backend=backend, **extra)
    assert [o.dtype for o in out] == [torch.float32, dtype]
    t_out = extra["t_hat_next"].cpu() if churning else t_next.cpu()
    noise_atol = NOISE_ATOL * t_out if churning else 0.0
    assert_close("x_next", out[0], ref[0], eager[0], extra_atol=noise_atol)
    assert_close("net_in", out[1], ref[1], eager[1], extra_atol=noise_atol * p.c_in(t_out),
                 floor_ulps=net_in_ulps(p))


@params("backend", BACKENDS)
def test_per_sample_seeds_in_ops(poison, backend):
    # Per-sample seeds: each image's noise depends on its own seed only, on every backend.
    p = schedules.get_precond("fdm_edm")
    y = torch.randn(3, 3, 17, 19, device=DEVICE)
    seeds = torch.tensor([5, 9, 13], device=DEVICE)
    out = ops.perturb(y, 1.3, p, seed=seeds, backend=backend)
    ref = ops.perturb(y, 1.3, p, seed=seeds, backend="torch")
    assert_close("net_in", out, ref.double(), ref)
    alone = ops.perturb(y[1:2], 1.3, p, seed=seeds[1:2], backend=backend)
    assert torch.equal(alone[0], out[1])


@requires_cpu_ext
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cpu_backend_same_with_one_and_two_threads(layout):
    """Tasks own disjoint chunks and their own partial sums: the thread count cannot change a bit."""
    p = schedules.get_precond("fdm_vp")
    g = _gen("threads", layout)
    y, F = _layout(_rand((5, 3, 17, 19), g), layout), _layout(_rand((5, 3, 17, 19), g), layout)
    x, d = y * 3, F * 0.5
    sigma = _sigmas(p, 5, g)

    def run_all():
        F_ = F.clone().requires_grad_(True)
        loss = ops.denoise_loss(F_, y, sigma, p, seed=4, reduction="none", backend="cpu")
        loss.backward(torch.ones(5))
        return [ops.perturb(y, sigma, p, seed=4, backend="cpu"), loss.detach(), F_.grad,
                *ops.churn(x, sigma, sigma * 1.1, p, seed=2, backend="cpu"),
                *ops.euler_step(x, F, sigma, sigma * 0.5, p, backend="cpu"),
                *ops.heun_step(x, d, F, sigma, sigma * 0.5, p, t_hat_next=sigma * 0.6, seed=8, backend="cpu")]

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run_all()
        torch.set_num_threads(2)
        two = run_all()
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@requires_triton
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_loss_backward_with_and_without_a_saved_gradient(poison, dtype, layout):
    """The Triton loss keeps G = 2 w c_out (D - y) from its forward when a gradient will be needed
    (backward: one scale, scale_grad); a forward that kept none regenerates the noise (loss_bwd). Both
    against the float64 reference, on fresh inputs."""
    from fdm_fast.ops import triton_loss

    p = schedules.get_precond("fdm_ve")
    seed = int(torch.randint(0, 2**31, (1,)))  # fresh inputs each run, named in a failure
    g = torch.Generator().manual_seed(seed)
    mk = lambda: _dev(torch.randn(5, 3, 6, 7, generator=g), layout, dtype)  # noqa: E731
    F, y = mk(), mk()
    s = torch.exp(torch.randn(5, generator=g)).float().to(DEVICE)
    grad = (torch.rand(5, generator=g) + 0.5).to(DEVICE)
    r, clamp = torch.tensor([[123, 4]], device=DEVICE), torch.tensor([30.0], device=DEVICE)
    kind, fdm, params = p.kernel_spec()
    want = ops.reference.denoise_loss_backward(grad.double(), F.double(), y.double(), s.double(), p, r, None,
                                               clamp.double())
    eager = ops.reference.denoise_loss_backward(grad, F, y, s, p, r, None, clamp)
    for save in (True, False):
        Fg = F.clone().requires_grad_(True)
        per_sample, G = triton_loss.loss_fwd(Fg, y, s, r, None, clamp, kind, fdm, list(params), save)
        assert G.shape == (F.shape if save else (0,))
        per_sample.backward(grad)
        assert Fg.grad.dtype == dtype
        assert Fg.grad.is_contiguous(memory_format=torch.channels_last) == (layout == "channels_last")
        assert_close(f"dF (save_grad={save}, inputs from seed {seed})", Fg.grad, want, eager)
