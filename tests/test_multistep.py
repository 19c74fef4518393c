"""ops.multistep, the solvers' one fused step: every backend that implements it against a float64
formula written out here, over history lengths, guidance, noise, per-sample and shared coefficients,
network dtypes and layouts; and the dispatcher's handling of the backends that do not implement it."""

import itertools

import pytest
import torch

from conftest import DEVICE, HAS_CPU_EXT, HAS_CUDA, assert_close, requires_triton_on_cpu
from fdm_fast import ops

BACKENDS = ["torch", pytest.param("triton", marks=requires_triton_on_cpu) if not HAS_CUDA else "triton"] + \
    (["cuda" if HAS_CUDA else "cpu"] if HAS_CPU_EXT else [])


def _want(x, F, G, H, c, noise, dt=torch.float64):
    """The op's definition in ``dt`` (float64: the reference; float32: eager rounding), from the
    test's own copy of the formula."""
    col = {k: (v.to(dt).reshape(-1, 1, 1, 1) if isinstance(v, torch.Tensor) else float(v)) for k, v in c.items()}
    xd = x.to(dt)
    D = col["c_skip"] * xd + col["c_out"] * F.to(dt) + (col["w_G"] * G.to(dt) if G is not None else 0)
    acc = col["a"] * xd + col["b"] * D
    for k, t in enumerate(H):
        acc = acc + col[f"h{k}"] * t.to(dt)
    acc = acc + col["s"] * noise.to(dt)
    return acc, col["cin"] * acc, col["p"] * xd + col["q"] * D


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K,guide,noisy,per_sample,net_dtype,channels_last",
                         [(k, g, n, ps, nd, cl) for (k, g, n, ps, nd, cl) in itertools.product(
                             range(5), (False, True), (False, True), (False, True),
                             (torch.float32, torch.bfloat16, torch.float16), (False, True))
                          if (k + g + n + ps + cl + [torch.float32, torch.bfloat16, torch.float16].index(nd)) % 3 == 0])
def test_multistep_matches_float64(backend, K, guide, noisy, per_sample, net_dtype, channels_last):
    g = torch.Generator().manual_seed(1000 * K + 100 * guide + 10 * noisy + per_sample)
    B, shape = 3, (3, 4, 5, 6)
    mk = lambda dt=torch.float32: torch.randn(shape, generator=g).to(DEVICE, dt)  # noqa: E731
    x, F = mk() * 4, mk(net_dtype)
    G = mk(net_dtype) if guide else None
    H = [mk() for _ in range(K)]
    if channels_last:
        x, F = x.contiguous(memory_format=torch.channels_last), F.contiguous(memory_format=torch.channels_last)
        G = G.contiguous(memory_format=torch.channels_last) if G is not None else None
        H = [t.contiguous(memory_format=torch.channels_last) for t in H]
    coef = lambda: (torch.rand(B, generator=g).to(DEVICE) - 0.3) if per_sample else float(torch.rand(1, generator=g)) - 0.3  # noqa: E731,E501
    c = dict(c_skip=coef(), c_out=coef(), w_G=coef() if guide else 0.0, a=coef(), b=coef(),
             **{f"h{k}": coef() for k in range(K)}, cin=coef(), p=coef(), q=coef())
    seeds = torch.tensor([11, 12, 13], device=DEVICE)
    if noisy:  # one sample without noise: the kernels skip its Philox, the value must not change
        c["s"] = torch.tensor([0.5, 0.0, 1.5], device=DEVICE) if per_sample else 0.7
    else:
        c["s"] = 0.0
    out = ops.multistep(x, F, c_skip=c["c_skip"], c_out=c["c_out"], a=c["a"], b=c["b"], history=H,
                        h=[c[f"h{k}"] for k in range(K)], G=G, w_G=c["w_G"], noise_scale=c["s"], seed=seeds,
                        offset=7, c_in_next=c["cin"], keep=(c["p"], c["q"]), net_dtype=net_dtype, backend=backend)
    noise = ops.randn(shape, seed=seeds, offset=7, device=DEVICE, backend="torch")
    want = _want(x, F, G, H, c, noise)
    eager = _want(x, F, G, H, c, noise, torch.float32)
    for name, o, w, e, dt in zip(("x_next", "net_in", "kept"), out, want, eager, (torch.float32, net_dtype,
                                                                                   torch.float32)):
        assert o.dtype == dt, f"{name}: dtype {o.dtype}, expected {dt}"
        if channels_last:
            assert o.is_contiguous(memory_format=torch.channels_last), f"{name}: layout not kept"
        assert_close(name, o, w, e.to(dt) if dt != torch.float32 else e.float(), dtype=dt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_multistep_optional_outputs_and_explicit_noise(backend):
    g = torch.Generator().manual_seed(5)
    x, F = torch.randn(2, 3, 4, 4, generator=g).to(DEVICE), torch.randn(2, 3, 4, 4, generator=g).to(DEVICE)
    n = torch.randn(2, 3, 4, 4, generator=g).to(DEVICE)
    x_next, net_in, kept = ops.multistep(x, F, c_skip=0.5, c_out=2.0, a=0.25, b=1.0, noise=n, noise_scale=0.5,
                                         backend=backend)
    assert net_in is None and kept is None
    torch.testing.assert_close(x_next, 0.25 * x + (0.5 * x + 2 * F) + 0.5 * n, rtol=1e-6, atol=1e-6)
    # no network output: history and state only (a solver's corrector or predictor from stored D's)
    H = [torch.randn(2, 3, 4, 4, generator=g).to(DEVICE)]
    x_next, net_in, _ = ops.multistep(x, a=2.0, history=H, h=[-1.0], c_in_next=0.5, backend=backend)
    torch.testing.assert_close(x_next, 2 * x - H[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(net_in, 0.5 * (2 * x - H[0]), rtol=1e-6, atol=1e-6)


def test_multistep_errors_and_dispatch(monkeypatch):
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"history: expected at most 4 stored tensors, got 5"):
        ops.multistep(x, history=[x] * 5, h=[1.0] * 5)
    with pytest.raises(ValueError, match=r"h: expected one coefficient per history tensor \(2\), got 1"):
        ops.multistep(x, history=[x, x], h=[1.0])
    with pytest.raises(ValueError, match=r"c_out: expected a number or a tensor of one value per sample \(2\)"):
        ops.multistep(x, x, c_out=torch.ones(3))
    with pytest.raises(ValueError, match=r"b: expected a finite number"):
        ops.multistep(x, x, b=float("nan"))
    with pytest.raises(TypeError, match=r"x: expected dtype float32"):
        ops.multistep(x.half(), x)
    with pytest.raises(ValueError, match=r"history\[0\]: expected shape"):
        ops.multistep(x, history=[x[:1]], h=[1.0])
    with pytest.raises(ValueError, match=r"G: a guiding network output needs F"):
        ops.multistep(x, G=x)
    # an op that some backend lacks (_backends.PARTIAL; none today): never picked by default, an error
    # naming the op when asked for
    from fdm_fast.ops import _backends
    monkeypatch.setattr(_backends, "unavailable_reason", lambda b, d: "")
    monkeypatch.setitem(_backends.PARTIAL, "newop", ("torch", "triton"))
    assert _backends._select("cuda", None, None, "newop") == "triton"
    assert _backends._select("cpu", None, None, "newop") == "torch"
    assert _backends._select("cuda", None, None, "multistep") == "triton"  # its own order on CUDA (device time)
    assert _backends._select("cuda", "cuda", None, "multistep") == "cuda"
    assert _backends._select("cuda", None, None, "perturb") == "cuda"
    with pytest.raises(ValueError, match=r"backend='cuda': the cuda backend does not implement ops.newop"):
        _backends._select("cuda", "cuda", None, "newop")
    with pytest.raises(ValueError, match=r"\$FDM_FAST_BACKEND='cpu': the cpu backend does not implement"):
        _backends._select("cpu", None, "cpu", "newop")
