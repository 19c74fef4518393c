"""Shared test helpers: the Triton interpreter on CPU-only machines, tolerances, poisoned outputs."""

import os

import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter (numpy) on CPU tensors. It must be chosen
# before triton is imported, which happens when fdm_fast.ops loads its Triton modules.
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# tests/test_cuda_on_cpu.py runs cpu-backend tests in a subprocess with FDM_FAST_CUDA_ON_CPU set to a
# test build of the op library whose kernels are the CUDA ones run on the CPU (tests/cuda_on_cpu):
# it must replace fdm_fast._C before fdm_fast.ops loads.
CUDA_ON_CPU = os.environ.get("FDM_FAST_CUDA_ON_CPU", "")
if CUDA_ON_CPU:
    import cuda_on_cpu

    cuda_on_cpu.install(CUDA_ON_CPU, sm_count=int(os.environ.get("FDM_FAST_CUDA_ON_CPU_SMS", "2")))


def pytest_sessionfinish(session, exitstatus):
    report = os.environ.get("FDM_FAST_CUDA_ON_CPU_REPORT")
    if CUDA_ON_CPU and report:  # how many CUDA launches the run emulated (the caller checks it ran them)
        import fdm_fast

        with open(report, "w") as f:
            f.write(str(fdm_fast._C.emulated_launches()))

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - triton is a test dependency
    HAS_TRITON = False

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def _has_cpu_ext():
    from fdm_fast import ops

    return "cpu" in ops.available_backends("cpu")


HAS_CPU_EXT = _has_cpu_ext()

def run_group(cmd, timeout, **kw):
    """subprocess.run(cmd, capture_output=True, text=True) in a session of its own; past ``timeout``
    seconds the whole process group is killed (torchrun's workers too: killing torchrun alone leaves
    them running, orphaned) and the test fails with the tail of stderr, instead of hanging the suite."""
    import signal
    import subprocess

    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         **kw)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"{' '.join(map(str, cmd))[:300]}: still running after {timeout} s, killed; stderr tail:\n"
                    f"{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def tiny_snapshot(path, resolution: int = 8, *, attn: bool = True, label_dim: int = 0, **network):
    """Write an fdm_fast snapshot of a tiny untrained fdm_edm DDPM++ network (one channel; 16 channels at
    two levels, attention at the lower one unless ``attn`` is False; ``network`` overrides) to ``path``
    and return it. The weights come from ``torch.manual_seed(0)``, so every call gives the same ones."""
    from fdm_fast.nn import build_denoiser

    net = dict(model_channels=16, channel_mult=(1, 2), num_blocks=1,
               attn_resolutions=(resolution // 2,) if attn else ()) | network
    cfg = dict(precond="fdm_edm", arch="ddpmpp", img_resolution=resolution, img_channels=1, network=net)
    if label_dim:
        cfg["label_dim"] = label_dim
    torch.manual_seed(0)
    torch.save(dict(config=cfg, ema=build_denoiser(cfg).state_dict()), path)
    return path


requires_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device; this machine has none")
requires_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
# tests that hand CPU tensors to the triton backend: only the interpreter runs them (set above without a
# GPU; on a GPU machine triton is for CUDA tensors, and these tests' CPU inputs are refused by design)
requires_triton_on_cpu = pytest.mark.skipif(not (HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1"),
                                            reason="triton takes CPU tensors only under TRITON_INTERPRET=1")
# The compiled extension is built by `pip install --no-build-isolation -e .` (and by CI); where it
# is missing the reason is printed, so a silently skipped backend cannot pass for a tested one.
requires_cpu_ext = pytest.mark.skipif(not HAS_CPU_EXT, reason="fdm_fast._C (cpu backend) is not built")
requires_cuda_ext = pytest.mark.skipif(not (HAS_CUDA and HAS_CPU_EXT), reason="needs a GPU and fdm_fast._C with CUDA")

# Smallest error floor per output dtype, relative to the largest reference magnitude: one unit in
# the last place. The main bound is relative to eager PyTorch's own error (see assert_close).
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float64: 2.0**-52}


def assert_close(name, out, ref64, eager=None, *, dtype=None, factor=2.0, floor_ulps=4.0, extra_atol=0.0):
    """Check ``out`` against the float64 reference ``ref64``, sample by sample (dim 0).

    In each sample the error must be at most ``factor`` times eager PyTorch's error on the same
    inputs (``eager``: the torch backend in the test dtype), plus ``floor_ulps`` ULPs of the output
    dtype at the sample's largest reference magnitude (the flash-attention standard), plus
    ``extra_atol`` (a float or one value per sample). Per-sample bounds keep a small-sigma sample's
    error from hiding under a large-sigma sample's scale. Prints max/mean error and the first bad index.
    """
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref64.shape)}"
    dtype = dtype or out.dtype
    o, r = out.detach().double().cpu(), ref64.detach().double().cpu()
    assert not torch.isnan(o).any(), f"{name}: NaN in output (an element left unwritten?) at " \
        f"{tuple(torch.nonzero(torch.isnan(o))[0].tolist())}"
    B = o.shape[0]
    err = (o - r).abs()
    per = lambda t: t.reshape(B, -1).amax(dim=1)  # noqa: E731
    scale = per(r.abs())
    bound = floor_ulps * ULP[dtype] * scale.clamp_min(1e-30)
    bound = bound + torch.as_tensor(extra_atol, dtype=torch.float64).reshape(-1).cpu()
    if eager is not None:
        bound = bound + factor * per((eager.detach().double().cpu() - r).abs())
    full = bound.reshape(B, *([1] * (o.dim() - 1))).expand_as(err)
    if (err > full).any():
        idx = tuple(torch.nonzero(err > full)[0].tolist())
        raise AssertionError(f"{name}: error {err[idx].item():.3g} > bound {full[idx].item():.3g} at first bad index "
                             f"{idx}: got {o[idx].item()}, want {r[idx].item()} (max error {err.max().item():.3g}, "
                             f"mean {err.mean().item():.3g}, sample scale {scale[idx[0]].item():.3g})")


@pytest.fixture
def poison():
    """Fill every Triton and compiled-extension output with NaN before its kernel runs."""
    from fdm_fast.ops import triton_common as tc  # noqa: F401  (triton is a test dependency)

    tc.POISON = True
    if HAS_CPU_EXT:
        from fdm_fast import _C

        _C.set_poison(True)
    yield
    tc.POISON = False
    if HAS_CPU_EXT:
        _C.set_poison(False)
