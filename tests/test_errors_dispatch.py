"""Bad input gets a clear ValueError/TypeError naming the argument; backend choice per docs/design.md 2.1."""

import math

import pytest
import torch

from conftest import HAS_TRITON, requires_cpu_ext, requires_triton_on_cpu
from fdm_fast import ops, schedules

P = "fdm_edm"
y = torch.randn(2, 3, 8, 8)
F = torch.randn(2, 3, 8, 8)


def raises(exc, match):
    return pytest.raises(exc, match=match)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=requires_triton_on_cpu)])
def test_shape_dtype_device_mismatch(backend):
    with raises(ValueError, r"y: expected shape \(2, 3, 8, 8\) \(the shape of F\), got \(2, 3, 8, 9\)"):
        ops.denoise_loss(F, torch.randn(2, 3, 8, 9), 1.0, P, backend=backend)
    with raises(TypeError, r"F: expected dtype float32 or bfloat16 or float16.*got int64"):
        ops.denoise_loss(torch.ones(2, 3, 8, 8, dtype=torch.int64), y, 1.0, P, backend=backend)
    with raises(TypeError, r"y: expected a torch.Tensor, got list"):
        ops.perturb([1.0, 2.0], 1.0, P, backend=backend)
    with raises(ValueError, r"noise: expected shape"):
        ops.perturb(y, 1.0, P, noise=torch.randn(2, 3, 8), backend=backend)
    with raises(ValueError, r"sigma: expected one value or one per sample \(2\), got shape \(3,\)"):
        ops.perturb(y, torch.ones(3), P, backend=backend)
    with raises(TypeError, r"x: expected dtype float32"):
        ops.euler_step(y.half(), F, 1.0, 0.5, P, backend=backend)
    with raises(ValueError, r"d: expected shape"):
        ops.heun_step(y, y[:1], F, 1.0, 0.5, P, backend=backend)
    with raises(TypeError, r"out_dtype"):
        ops.perturb(y, 1.0, P, out_dtype=torch.int32, backend=backend)
    if backend != "torch":
        with raises(TypeError, r"float64"):
            ops.perturb(y.double(), 1.0, P, backend=backend)
    meta = torch.empty(2, 3, 8, 8, device="meta")
    with raises(ValueError, r"device"):
        ops.denoise_loss(F, meta, 1.0, P, backend="torch")


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_invalid_sigma(bad):
    with raises(ValueError, r"sigma: expected a finite number > 0, got"):
        ops.perturb(y, bad, P)
    with raises(ValueError, r"sigma: expected a finite number > 0 per sample, got .* at index 1"):
        ops.denoise_loss(F, y, torch.tensor([1.0, bad]), P)
    with raises(ValueError, r"t_cur: expected a finite number > 0"):
        ops.euler_step(y, F, bad, 0.0, P)
    if bad != 0.0:  # t_next may be 0 (the last step), never negative or non-finite
        with raises(ValueError, r"t_next: expected a finite number >= 0"):
            ops.euler_step(y, F, 1.0, bad, P)
    with raises(ValueError, r"t_next: expected a finite number > 0"):  # Heun's correction divides by t_next
        ops.heun_step(y, y, F, 1.0, 0.0, P)


def test_other_bad_arguments():
    with raises(ValueError, r"precond: expected one of vp, ve, edm, fdm_vp, fdm_ve, fdm_edm, got 'ddpm'"):
        ops.perturb(y, 1.0, "ddpm")
    with raises(TypeError, r"precond: expected a preconditioning name"):
        ops.perturb(y, 1.0, 3)
    with raises(ValueError, r"seed: expected an int in \[0, 2\^63\), got -1"):
        ops.perturb(y, 1.0, P, seed=-1)
    with raises(TypeError, r"seed: expected an int"):
        ops.perturb(y, 1.0, P, seed=1.5)
    with raises(ValueError, r"seed: expected an integer tensor of shape \[2\]"):
        ops.perturb(y, 1.0, P, seed=torch.tensor([1, 2, 3]))
    with raises(ValueError, r"reduction: expected 'mean', 'sum' or 'none', got 'avg'"):
        ops.denoise_loss(F, y, 1.0, P, reduction="avg")
    with raises(ValueError, r"clamp: expected a positive number"):
        ops.denoise_loss(F, y, 1.0, P, clamp=-2.0)
    with raises(ValueError, r"t_hat: expected t_hat >= t_cur"):
        ops.churn(y, 2.0, 1.0, P)
    with raises(ValueError, r"t_hat_next: expected t_hat_next >= t_next"):
        ops.heun_step(y, y, F, 2.0, 1.0, P, t_hat_next=0.5)
    with raises(ValueError, r"S_noise: expected a finite number >= 0"):
        ops.churn(y, 1.0, 2.0, P, S_noise=math.nan)
    with raises(ValueError, r"shape: expected a non-empty shape"):
        ops.randn([0, 3])
    with raises(ValueError, r"y: expected a batch of at least one sample"):
        ops.perturb(torch.randn(0, 3), 1.0, P)


def test_backend_selection(monkeypatch):
    monkeypatch.delenv("FDM_FAST_BACKEND", raising=False)
    assert "torch" in ops.available_backends("cpu")
    # CPU tensors: cpu (when the extension is built), else torch; never triton by default
    want = "cpu" if "cpu" in ops.available_backends("cpu") else "torch"
    assert ops.select_backend("cpu") == want
    assert ops.select_backend("cpu", "torch") == "torch"
    monkeypatch.setenv("FDM_FAST_BACKEND", "torch")
    assert ops.select_backend("cpu") == "torch"
    monkeypatch.setenv("FDM_FAST_BACKEND", "nope")
    with raises(ValueError, r"\$FDM_FAST_BACKEND: expected one of torch, triton, cuda, cpu, got 'nope'"):
        ops.perturb(y, 1.0, P)
    monkeypatch.delenv("FDM_FAST_BACKEND")
    # CUDA tensors: the compiled cuda ops first, then triton (their order, with every backend available)
    from fdm_fast.ops import _backends
    monkeypatch.setattr(_backends, "unavailable_reason", lambda b, d: "")
    assert _backends._select("cuda", None, None) == "cuda"
    monkeypatch.setattr(_backends, "unavailable_reason", lambda b, d: "not built" if b == "cuda" else "")
    assert _backends._select("cuda", None, None) == "triton"
    with raises(ValueError, r"backend: expected one of torch, triton, cuda, cpu, got 'jax'"):
        ops.perturb(y, 1.0, P, backend="jax")


def test_unavailable_backend_is_an_error_never_a_fallback(monkeypatch):
    if not torch.cuda.is_available():
        with raises(ValueError, r"backend='cuda' is not available for cpu tensors"):
            ops.perturb(y, 1.0, P, backend="cuda")
    if "cpu" not in ops.available_backends("cpu"):
        with raises(ValueError, r"backend='cpu' is not available for cpu tensors: .*fdm_fast._C"):
            ops.perturb(y, 1.0, P, backend="cpu")
    if HAS_TRITON and not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with raises(ValueError, r"backend='triton' is not available for cpu tensors: .*TRITON_INTERPRET"):
            ops.perturb(y, 1.0, P, backend="triton")
        assert "triton" not in ops.available_backends("cpu")


ALL = ["torch", pytest.param("triton", marks=requires_triton_on_cpu), pytest.param("cpu", marks=requires_cpu_ext)]


@pytest.mark.parametrize("backend", ALL)
def test_perturb_gradient_with_respect_to_y_on_every_backend(backend):
    """d net_in / dy = c_in(sigma), d x / dy = 1: the same gradient from every backend (the fused ones
    used to return requires_grad outputs whose gradient never arrived)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(3, 3, 8, 8, generator=g).requires_grad_(True)
    s = torch.tensor([0.3, 2.0, 40.0])
    w1, w2 = torch.randn(3, 3, 8, 8, generator=g), torch.randn(3, 3, 8, 8, generator=g)
    net_in, x = ops.perturb(y, s, "fdm_edm", seed=4, return_x=True, backend=backend)
    (gy,) = torch.autograd.grad((net_in * w1).sum() + (x * w2).sum(), y)
    c_in = schedules.get_precond(P).c_in(s).reshape(-1, 1, 1, 1)
    want = w1 * c_in + w2
    torch.testing.assert_close(gy, want, rtol=1e-6, atol=1e-6)
    (gy2,) = torch.autograd.grad((ops.perturb(y, s, "fdm_edm", seed=4, backend=backend) * w1).sum(), y)
    torch.testing.assert_close(gy2, w1 * c_in, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ALL)
def test_step_ops_refuse_inputs_that_require_grad_on_every_backend(backend):
    x = torch.randn(2, 3, 8, 8)
    F = torch.randn(2, 3, 8, 8).requires_grad_(True)
    with pytest.raises(ValueError, match="euler_step: F requires grad"):
        ops.euler_step(x, F, 1.0, 0.5, P, backend=backend)
    with pytest.raises(ValueError, match="heun_step: F requires grad"):
        ops.heun_step(x, x, F, 1.0, 0.5, P, backend=backend)
    with pytest.raises(ValueError, match="churn: x requires grad"):
        ops.churn(x.clone().requires_grad_(True), 1.0, 1.2, P, backend=backend)
    with torch.no_grad():
        ops.euler_step(x, F, 1.0, 0.5, P, backend=backend)  # fine without grad mode


@pytest.mark.parametrize("backend", ALL)
def test_negative_seeds_and_offsets_refused_as_ints_and_as_tensors(backend):
    y = torch.randn(2, 3, 4, 4)
    for kw in (dict(seed=-1), dict(seed=torch.tensor([3, -1])), dict(offset=-5),
               dict(seed=torch.tensor([1, 2]), offset=torch.tensor([0, -5])), dict(offset=torch.tensor([2**62]))):
        with pytest.raises(ValueError, match="seed|offset"):
            ops.perturb(y, 1.0, "edm", backend=backend, **kw)


@requires_triton_on_cpu
def test_triton_ops_run_interpreted_under_a_torch_whose_wrap_triton_refuses_them(monkeypatch):
    """torch 2.11 raises in ``wrap_triton`` for the interpreter's kernels (2.13 passes them through):
    every Triton launch goes through ``triton_common.traceable``, which never hands them over."""
    import triton.runtime.interpreter as interp

    from fdm_fast.ops import triton_common

    def old_wrap_triton(kernel):  # what torch 2.11's wrap_triton does with an interpreted kernel
        if isinstance(kernel, interp.InterpretedFunction):
            raise RuntimeError("wrap_triton only works on functions annotated with triton.jit or triton.autotune")
        return kernel

    def every_op():
        g = torch.Generator().manual_seed(7)
        x, F, G, H = (torch.randn(2, 3, 8, 8, generator=g) for _ in range(4))
        Fg = F.clone().requires_grad_(True)
        ops.denoise_loss(Fg, y, 1.5, P, seed=3, backend="triton").backward()
        return [ops.perturb(y, 1.5, P, seed=3, backend="triton"), ops.randn((2, 3, 8, 8), seed=3, backend="triton"),
                Fg.grad, *ops.churn(x, 1.0, 1.2, P, seed=3, backend="triton"),
                *ops.euler_step(x, F, 1.0, 0.5, P, backend="triton"),
                *ops.heun_step(x, F, G, 1.0, 0.5, P, t_hat_next=0.6, seed=3, backend="triton"),
                *ops.multistep(x, F, c_skip=0.5, c_out=2.0, a=0.25, b=1.0, history=[H], h=[-0.5], G=G, w_G=0.3,
                               noise_scale=0.1, seed=3, c_in_next=0.5, keep=(0.0, 1.0), backend="triton")]

    expected = every_op()
    monkeypatch.setattr(triton_common, "wrap_triton", old_wrap_triton)
    with pytest.raises(RuntimeError, match="wrap_triton only works"):  # the stand-in does refuse them
        triton_common.wrap_triton(triton_common.randn4)
    for got, want in zip(every_op(), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)



def test_triton_op_signatures_are_ones_torch_2_6_can_read():
    """torch.library infers each Triton op's schema from its annotations. torch 2.6 (pyproject's floor)
    rejects builtin generics (list[float]) and evaluates string annotations (from __future__ import
    annotations) in its own namespace, where Tuple is undefined: either made the whole triton backend
    fail to load there, while torch 2.13 accepts both. triton_op keeps no handle on the function it
    wraps, so the sources are read."""
    import ast
    from pathlib import Path

    import fdm_fast.ops

    found = 0
    for name in ("triton_loss", "triton_perturb", "triton_sampler"):
        tree = ast.parse((Path(fdm_fast.ops.__file__).parent / f"{name}.py").read_text())
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                assert "annotations" not in [a.name for a in node.names], f"{name}: from __future__ import annotations"
            if isinstance(node, ast.FunctionDef) and any("triton_op" in ast.unparse(d) for d in node.decorator_list):
                found += 1
                anns = [a.annotation for a in node.args.args + node.args.kwonlyargs if a.annotation] + [node.returns]
                for sub in (n for a in anns if a is not None for n in ast.walk(a)):
                    if isinstance(sub, ast.Subscript) and isinstance(sub.value, ast.Name):
                        assert sub.value.id not in ("list", "tuple", "dict"), \
                            f"{name}.{node.name}: {ast.unparse(sub)} (use typing.{sub.value.id.title()})"
    assert found == 9
