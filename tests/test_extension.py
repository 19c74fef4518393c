"""The compiled extension fdm_fast._C at its own boundary: clear Python errors (never a crash) for bad
input sent straight to torch.ops.fdm_fast_ext, the regenerating loss backward, and every build of the
CPU kernels (FDM_FAST_CPU_ISA)."""

import math
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CUDA_ON_CPU, DEVICE, assert_close, requires_cpu_ext
from fdm_fast import ops, schedules

pytestmark = requires_cpu_ext

SPEC = list(schedules.get_precond("fdm_edm").kernel_spec())
SPEC[2] = list(SPEC[2])
y = torch.randn(2, 3, 8, 8)
sigma = torch.ones(2)
rng = torch.tensor([[1, 0]])


def ext():
    return torch.ops.fdm_fast_ext


@pytest.mark.parametrize("call,exc,match", [
    (lambda: ext().perturb(y.long(), sigma, rng, None, *SPEC, torch.float32, False), TypeError,
     r"y: expected float32, bfloat16 or float16, got Long"),
    (lambda: ext().perturb(y, torch.ones(3), rng, None, *SPEC, torch.float32, False), ValueError,
     r"sigma: expected a contiguous \[2\] tensor \(one value per sample\), got shape \[3\]"),
    (lambda: ext().perturb(y, sigma.double(), rng, None, *SPEC, torch.float32, False), TypeError,
     r"sigma: expected a float32 tensor"),
    (lambda: ext().perturb(y, sigma, torch.tensor([1, 0]), None, *SPEC, torch.float32, False), ValueError,
     r"rng: expected a contiguous \[1, 2\] or \[2, 2\] tensor"),
    (lambda: ext().perturb(y, sigma, rng.int(), None, *SPEC, torch.float32, False), TypeError, r"rng: expected int64"),
    (lambda: ext().perturb(y, sigma, rng, torch.randn(2, 3, 8), *SPEC, torch.float32, False), ValueError,
     r"noise: expected shape"),
    (lambda: ext().perturb(y, sigma, rng, None, 7, True, SPEC[2], torch.float32, False), ValueError,
     r"kind: expected 0 \(vp\), 1 \(ve\) or 2 \(edm\), got 7"),
    (lambda: ext().perturb(y, sigma, rng, None, 2, True, [1.0], torch.float32, False), ValueError,
     r"params: expected the 8 floats"),
    (lambda: ext().perturb(y.transpose(2, 3), sigma, rng, None, *SPEC, torch.float32, False), ValueError,
     r"y: expected a contiguous or channels_last tensor"),
    (lambda: ext().perturb(y, sigma, rng, None, *SPEC, torch.int8, False), TypeError, r"out_dtype: expected"),
    (lambda: ext().loss_fwd(y, y[:1], sigma, rng, None, torch.ones(1), *SPEC, False), ValueError,
     r"y: expected shape \[2, 3, 8, 8\] \(the shape of F\)"),
    (lambda: ext().loss_fwd(y, y.contiguous(memory_format=torch.channels_last), sigma, rng, None, torch.ones(1),
                            *SPEC, False), ValueError, r"y: expected the memory layout of F"),
    (lambda: ext().loss_fwd(y, y, sigma, rng, None, torch.ones(2), *SPEC, False), ValueError, r"clamp: expected one"),
    (lambda: ext().euler_step(y.half(), y, sigma, sigma, *SPEC, torch.float32, True, True), TypeError,
     r"x: expected float32 \(sampler state\)"),
    (lambda: ext().heun_step(y, y, y, sigma, sigma, torch.ones(5), rng, None, 1.0, *SPEC, torch.float32), ValueError,
     r"t_hat_next: expected a contiguous \[2\] tensor"),
    (lambda: ext().randn([0, 3], rng), ValueError, r"shape: expected a non-empty shape"),
    (lambda: ext().multistep(y, y, None, [y], torch.ones(1, 9), rng, None, False, torch.float32, True, False),
     ValueError, r"coef: expected a contiguous \[1, 10\] or \[2, 10\] tensor"),
    (lambda: ext().multistep(y, None, y, [], torch.ones(1, 9), rng, None, False, torch.float32, True, False),
     ValueError, r"G: a guiding network output needs F"),
    (lambda: ext().multistep(y, y, None, [y.half()], torch.ones(1, 10), rng, None, False, torch.float32, True, False),
     TypeError, r"history\[0\]: expected float32"),
    (lambda: ext().scale_grad(torch.empty(0, 3), torch.ones(0)), ValueError, r"G: expected a batch"),
])
def test_bad_input_raises_a_python_error(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_regenerating_backward_op_matches_reference(poison):
    # loss_bwd regenerates the noise instead of reading the forward's saved gradient.
    p = schedules.get_precond("fdm_ve")
    F, yy = torch.randn(5, 3, 17, 19), torch.randn(5, 3, 17, 19)
    s = torch.exp(torch.randn(5)).float()
    grad = torch.rand(5) + 0.5
    r = torch.tensor([[123, 4]])
    kind, fdm, params = p.kernel_spec()
    clamp = torch.tensor([30.0])
    dF = ext().loss_bwd(grad, F, yy, s, r, None, clamp, kind, fdm, list(params))
    want = ops.reference.denoise_loss_backward(grad.double(), F.double(), yy.double(), s.double(), p, r, None,
                                               clamp.double())
    eager = ops.reference.denoise_loss_backward(grad, F, yy, s, p, r, None, clamp)
    assert_close("dF", dF, want, eager)
    # ... and agrees with the saved-gradient backward of the public op
    Fg = F.clone().requires_grad_(True)
    ops.denoise_loss(Fg, yy, s, p, seed=123, offset=4, clamp=30.0, reduction="none", backend="cpu").backward(grad)
    torch.testing.assert_close(Fg.grad, dF, rtol=1e-6, atol=1e-6)


def _cpu_flags() -> set:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return {f for line in lines if line.startswith("flags") for f in line.split()[2:]}
    except OSError:
        return set()


def _isas_here() -> list:
    """The CPU kernel builds this machine can run (csrc/cpu/ops_cpu.cpp, Isa), best first."""
    f = _cpu_flags()
    isas = ["base"]
    if {"avx2", "fma", "bmi2"} <= f:
        isas.insert(0, "avx2")
        if {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"} <= f:
            isas.insert(0, "avx512")
    return isas


def _run_isa(isa, code, *args):
    env = dict(os.environ, FDM_FAST_CPU_ISA=isa)
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600)


_NOISE = ("import sys, torch; from fdm_fast import ops; from fdm_fast.ops import extension; "
          "n = ops.randn((3, 3, 17, 19), seed=2**40 + 5, offset=2**32 - 7, backend='cpu'); "
          "torch.save(n, sys.argv[1]); print(extension.cpu_isa())")


# Under tests/cuda_on_cpu the `cpu` backend is the emulated CUDA build: these are about the real one.
real_cpu_build = pytest.mark.skipif(bool(CUDA_ON_CPU) or not sys.platform.startswith("linux"),
                                    reason="the real CPU build's variants (reads /proc/cpuinfo)")


@real_cpu_build
def test_every_cpu_build_gives_the_contracts_noise(tmp_path):
    """FDM_FAST_CPU_ISA caps the build the CPU kernels run: each one this machine has gives the noise
    contract's normals, AVX-512 (the hand-written Philox) and AVX2 bit for bit (integer Philox, the
    same FMAs in Box-Muller), the baseline build (no FMA) to rounding."""
    out = {}
    for isa in _isas_here():
        r = _run_isa(isa, _NOISE, str(tmp_path / f"{isa}.pt"))
        assert r.returncode == 0, r.stderr
        assert r.stdout.split()[-1] == isa  # the cap took effect
        out[isa] = torch.load(tmp_path / f"{isa}.pt")
    ref = ops.randn((3, 3, 17, 19), seed=2**40 + 5, offset=2**32 - 7, backend="torch")
    for isa, n in out.items():
        assert (n - ref).abs().max().item() <= 1e-5, isa
    if "avx512" in out:
        assert torch.equal(out["avx512"], out["avx2"])
    assert (out[_isas_here()[0]] - out["base"]).abs().max().item() <= 1e-6


@pytest.mark.slow
@real_cpu_build
@pytest.mark.parametrize("isa", ["avx2", "base"])
def test_lower_cpu_builds_pass_the_cpu_kernel_tests(isa):
    """The suite runs the best build this CPU has; the cpu-backend tests of the op files (float64
    references, every dtype and layout, poisoned outputs, noise, multistep) again on each lower one."""
    if isa not in _isas_here()[1:]:
        pytest.skip(f"the {isa} build is this CPU's best (or not runnable here): the suite already ran it")
    files = [str(Path(__file__).parent / f) for f in ("test_ops.py", "test_layouts.py", "test_noise.py",
                                                      "test_multistep.py")]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "cpu", *files],
                       env=dict(os.environ, FDM_FAST_CPU_ISA=isa), capture_output=True, text=True, timeout=900)
    tail = r.stdout[-3000:]
    assert r.returncode == 0, tail
    assert " passed" in tail and "failed" not in tail, tail


# Every compiled op on fixed inputs (read from argv[1]), outputs to argv[2]: run natively with
# FDM_FAST_CPU_ISA capped, and on an emulated CPU that lacks the wider instructions.
_EVERY_OP = r"""
import sys, torch
from fdm_fast import ops
from fdm_fast.ops import extension
I = torch.load(sys.argv[1])
x, F, y, s = I["x"], I["F"], I["y"], I["s"]
cl = lambda t: t.contiguous(memory_format=torch.channels_last)
O = {}
O["randn"] = ops.randn((3, 3, 17, 19), seed=2**40 + 5, offset=2**32 - 7, backend="cpu")
for dt in (torch.float32, torch.bfloat16, torch.float16):
    for name, yy in (("", y), ("_cl", cl(y)), ("_strided", y[:, :, ::2, 1::2])):
        O[f"perturb_{dt}{name}"] = ops.perturb(yy.to(dt), s, "fdm_edm", seed=3, offset=5, backend="cpu")
        Fg = F.to(dt)[:, :, : yy.shape[2], : yy.shape[3]].clone().requires_grad_(True)
        loss = ops.denoise_loss(Fg, yy.to(dt), s, "fdm_vp", seed=9, clamp=20.0, reduction="none", backend="cpu")
        loss.backward(torch.linspace(0.5, 1.5, len(s)))
        O[f"loss_{dt}{name}"], O[f"dF_{dt}{name}"] = loss.detach(), Fg.grad
    O[f"euler_{dt}"] = ops.euler_step(x, F.to(dt), s + 0.5, s, "edm", net_dtype=dt, backend="cpu")
    xe, d, _ = O[f"euler_{dt}"]
    O[f"heun_{dt}"] = ops.heun_step(x, d, F.to(dt), s + 0.5, s, "fdm_edm", t_hat_next=s * 1.1, seed=4,
                                    net_dtype=dt, backend="cpu")
    O[f"churn_{dt}"] = ops.churn(cl(x), s, s * 1.2, "fdm_edm", seed=7, net_dtype=dt, backend="cpu")
    O[f"multistep_{dt}"] = ops.multistep(x, F.to(dt), c_skip=0.3, c_out=s, a=0.9, b=0.1, history=[y, F],
                                         h=[0.2, -0.1], G=F.to(dt) * 0.5, w_G=1.5, noise_scale=0.05, seed=11,
                                         c_in_next=0.7, keep=(1.0, -1.0), net_dtype=dt, backend="cpu")
torch.save(O, sys.argv[2])
print(extension.cpu_isa())
"""

QEMU = shutil.which("qemu-x86_64")


@pytest.mark.slow
@real_cpu_build
@pytest.mark.skipif(not QEMU or platform.machine() != "x86_64",
                    reason="needs qemu-user (qemu-x86_64) on x86_64: .ci/run installs it where apt-get can")
@pytest.mark.parametrize("model,isa", [("Haswell", "avx2"), ("SandyBridge", "base")])
def test_a_cpu_without_avx512_or_avx2_picks_its_build_and_runs_no_wider_instruction(model, isa, tmp_path):
    """On a CPU that really lacks the wider instructions (qemu's Haswell: AVX2 and FMA, no AVX-512;
    its Sandy Bridge: AVX, no AVX2 or FMA) the extension picks its build from CPUID alone (no cap set),
    and runs every op, dtype and layout without an instruction that CPU lacks: qemu stops the process
    on one (SIGILL). The outputs are bit for bit those of this machine with FDM_FAST_CPU_ISA capped to
    the same build, so the emulated run is the code the cap tests."""
    if isa not in _isas_here():
        pytest.skip(f"this CPU cannot run the {isa} build natively to compare against")
    g = torch.Generator().manual_seed(0)
    inputs = {"x": torch.randn(4, 3, 16, 18, generator=g) * 3, "F": torch.randn(4, 3, 16, 18, generator=g),
              "y": torch.randn(4, 3, 16, 18, generator=g), "s": torch.rand(4, generator=g) * 5 + 0.05}
    torch.save(inputs, tmp_path / "in.pt")
    env = {k: v for k, v in os.environ.items() if k != "FDM_FAST_CPU_ISA"}
    emulated = subprocess.run([QEMU, "-cpu", model, sys.executable, "-c", _EVERY_OP, str(tmp_path / "in.pt"),
                               str(tmp_path / "emulated.pt")], env=env, capture_output=True, text=True, timeout=900)
    assert emulated.returncode == 0, emulated.stderr[-3000:]
    assert emulated.stdout.split()[-1] == isa  # detected, not capped
    native = _run_isa(isa, _EVERY_OP, str(tmp_path / "in.pt"), str(tmp_path / "native.pt"))
    assert native.returncode == 0, native.stderr[-3000:]
    got, want = torch.load(tmp_path / "emulated.pt"), torch.load(tmp_path / "native.pt")
    assert got.keys() == want.keys() and len(got) == 40
    for k in want:
        for a, b in zip(*(v if isinstance(v, tuple) else (v,) for v in (got[k], want[k]))):
            assert (a is None and b is None) or torch.equal(a, b), k


@real_cpu_build
def test_bad_cpu_isa_setting_is_an_error_not_a_fallback():
    r = _run_isa("sse", "from fdm_fast import ops; ops.randn((2, 4), backend='cpu')")
    assert r.returncode != 0
    assert "FDM_FAST_CPU_ISA: expected one of avx512, avx2, base (or unset), got 'sse'" in r.stderr


def test_meta_kernels_give_shapes_and_layouts():
    m = torch.empty(4, 3, 8, 8, device="meta").contiguous(memory_format=torch.channels_last)
    s, r = torch.empty(4, device="meta"), torch.empty(1, 2, dtype=torch.int64, device="meta")
    net_in, x = ext().perturb(m, s, r, None, *SPEC, torch.bfloat16, True)
    assert net_in.dtype == torch.bfloat16 and net_in.is_contiguous(memory_format=torch.channels_last)
    assert x.shape == m.shape and x.dtype == torch.float32
    loss, G = ext().loss_fwd(m, m, s, r, None, torch.empty(1, device="meta"), *SPEC, True)
    assert loss.shape == (4,) and G.shape == m.shape
    assert math.prod(ext().randn([2, 5], r).shape) == 10
    assert DEVICE.type in ("cpu", "cuda")


def test_extension_uses_the_shared_cxx_runtime():
    # An fdm_fast._C with its own copy of the C++ exception runtime (a compiler that links libstdc++
    # statically, as the H200 machine's /opt/gcc g++ did) crashed the process on its first argument error.
    import shutil

    import fdm_fast._C as C

    if not (shutil.which("readelf") and shutil.which("nm")):
        pytest.skip("readelf/nm (binutils) not installed")
    needed = subprocess.run(["readelf", "-d", C.__file__], capture_output=True, text=True, check=True).stdout
    assert "[libstdc++.so.6]" in needed, f"{C.__file__} does not link the shared libstdc++:\n{needed}"
    defined = subprocess.run(["nm", "-D", "--defined-only", C.__file__], capture_output=True, text=True,
                             check=True).stdout.split()
    own = [s for s in defined if s.startswith(("__cxa_throw", "__cxa_allocate_exception", "__cxa_begin_catch"))]
    assert not own, f"{C.__file__} defines its own C++ exception runtime: {own}"
