"""The CUDA kernels of csrc/cuda/ops_cuda.cu, run on the CPU under the cpu-backend tests (and the CPU
kernels under AddressSanitizer, last test).

tests/cuda_on_cpu builds the same CUDA source as host code (launches through an emulator: sequential
threads, or real threads with block and warp barriers for the reducing kernel) together with
bindings.cpp, loads it as fdm_fast._C in a fresh pytest process, where the ``cpu`` backend is then
the CUDA code, and runs the tests that check that backend: every op against its float64 reference
in both layouts, fp32/bf16/fp16, explicit and contract noise, poisoned outputs, opcheck, argument
errors, the samplers and solvers. ``multistep_kernel``, which has not run on a GPU yet, is among them.

Built with AddressSanitizer (when the compiler has it), a thread that touches memory outside its
tensors ends the run with a report. What this cannot see is listed in tests/cuda_on_cpu/__init__.py
(memory model, concurrent blocks, device math, speed). The last two tests show both checks bite: one
wrong coefficient column in the kernel's source fails the values, and a read one float past the end
(its value multiplied by 0) fails the sanitizer.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import cuda_on_cpu

HERE = Path(__file__).resolve().parent
CXX = os.environ.get("CXX", "g++")

pytestmark = pytest.mark.skipif(shutil.which(CXX) is None, reason=f"needs a C++ compiler ({CXX})")

# the tests of the `cpu` backend's kernels; in the other files every test touches the compiled ops
BACKEND_FILES = ["tests/test_ops.py", "tests/test_layouts.py", "tests/test_noise.py", "tests/test_multistep.py"]
WHOLE_FILES = ["tests/test_sampling.py", "tests/test_solvers.py", "tests/test_opcheck.py", "tests/test_extension.py"]
NOT_TRITON = "not triton"  # in WHOLE_FILES, the tests of the Triton kernels (interpreted; no compiled op in them)


# With the compiler's AddressSanitizer runtime every build is sanitized: a kernel thread that reads or
# writes outside its tensors stops the run with a report (without it, the same tests run unsanitized).
ASAN = cuda_on_cpu.asan_preload()


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return cuda_on_cpu.build(tmp_path_factory.mktemp("cuda_on_cpu"), sanitize=bool(ASAN))


def _pytest(lib, tmp_path, files, k=None, sms=2):
    """pytest over ``files`` with the CUDA kernels as the cpu backend: (result, passed, failed, launches,
    AddressSanitizer reports)."""
    run = len(list(tmp_path.glob("launches-*")))
    report, asan_log = tmp_path / f"launches-{run}", tmp_path / f"asan-{run}"
    env = dict(os.environ, FDM_FAST_CUDA_ON_CPU=str(lib), FDM_FAST_CUDA_ON_CPU_REPORT=str(report),
               FDM_FAST_CUDA_ON_CPU_SMS=str(sms), CUDA_VISIBLE_DEVICES="")  # CPU tensors even on a GPU machine
    if ASAN:
        env.update(LD_PRELOAD=ASAN, ASAN_OPTIONS=f"detect_leaks=0:log_path={asan_log}")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files] + (["-k", k] if k else [])
    res = subprocess.run(cmd, cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=1800)
    count = lambda word: int(m.group(1)) if (m := re.search(rf"(\d+) {word}", res.stdout)) else 0  # noqa: E731
    launches = int(report.read_text()) if report.exists() else 0
    asan = "".join(f.read_text()[:4000] for f in sorted(tmp_path.glob(f"asan-{run}*")))
    return res, count("passed"), count("failed"), launches, asan


def test_backend_tests_pass_on_the_cuda_kernels(lib, tmp_path):
    # one SM: grids of one block per sample, so every grid-stride loop over a sample's groups really loops
    res, passed, failed, launches, asan = _pytest(lib, tmp_path, BACKEND_FILES, k="cpu", sms=1)
    assert not asan, asan
    assert res.returncode == 0 and failed == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert passed >= 700 and launches >= passed, (passed, launches)  # the tests ran, on emulated CUDA launches


def test_samplers_solvers_opcheck_and_errors_pass_on_the_cuda_kernels(lib, tmp_path):
    res, passed, failed, launches, asan = _pytest(lib, tmp_path, WHOLE_FILES, k=NOT_TRITON, sms=4)
    assert not asan, asan
    assert res.returncode == 0 and failed == 0, res.stdout[-6000:] + res.stderr[-3000:]
    assert passed >= 100 and launches >= 1000, (passed, launches)


def _mutated(tmp_path, old, new):
    """A copy of csrc/ with ``old`` replaced by ``new`` in ops_cuda.cu."""
    src = (cuda_on_cpu.CSRC / "cuda" / "ops_cuda.cu").read_text()
    assert src.count(old) == 1, "the mutated line moved; update this test"
    csrc = tmp_path / "csrc"
    shutil.copytree(cuda_on_cpu.CSRC, csrc)
    (csrc / "cuda" / "ops_cuda.cu").write_text(src.replace(old, new))
    return csrc


def test_a_wrong_multistep_kernel_fails(tmp_path):
    """Mutation: the kept output's D coefficient read from the wrong column (q -> p) in the CUDA source."""
    csrc = _mutated(tmp_path, "o[k] = p * x[k] + qq * D[k];", "o[k] = p * x[k] + p * D[k];")
    bad = cuda_on_cpu.build(tmp_path / "build", csrc=csrc, sanitize=bool(ASAN))
    res, passed, failed, _, _ = _pytest(bad, tmp_path, ["tests/test_multistep.py"], k="cpu and float64")
    assert res.returncode != 0 and failed > 0, res.stdout[-3000:]


@pytest.mark.skipif(not ASAN, reason="needs the compiler's AddressSanitizer runtime")
def test_a_read_past_the_end_is_caught(tmp_path):
    """Mutation: the last thread of multistep_kernel also reads one float past the end of a stored
    tensor, multiplied by 0, so no value changes: only the sanitizer can see it."""
    old = "        load4(a.H[m], g, b, j, vec, hv);\n"
    csrc = _mutated(tmp_path, old, old + "        if (b == g.B - 1 && j + 4 >= g.P) hv[0] += 0.0f * a.H[m][b * g.P + j + 4];\n")
    bad = cuda_on_cpu.build(tmp_path / "build", csrc=csrc, sanitize=True)
    res, _, _, _, asan = _pytest(bad, tmp_path, ["tests/test_multistep.py"], k="cpu and float64")
    assert res.returncode != 0 and "heap-buffer-overflow" in asan and "multistep_kernel" in asan, \
        res.stdout[-2000:] + asan


@pytest.mark.skipif(not ASAN, reason="needs the compiler's AddressSanitizer runtime")
def test_cpu_kernels_under_address_sanitizer(tmp_path):
    """The same runs on the ordinary CPU kernels (ops_cpu.cpp: vector tails, noise buffers, channels_last
    addressing, per-task loss slots), built with AddressSanitizer: no access outside a tensor."""
    lib = cuda_on_cpu.build(tmp_path / "build", sanitize=True, kernels="cpu")
    # one process: the cpu-backend tests of BACKEND_FILES and the non-Triton tests of WHOLE_FILES
    whole = " or ".join(Path(f).stem for f in WHOLE_FILES)
    res, passed, failed, launches, asan = _pytest(lib, tmp_path, BACKEND_FILES + WHOLE_FILES,
                                                  k=f"(cpu or {whole}) and {NOT_TRITON}")
    assert not asan, asan
    assert res.returncode == 0 and failed == 0 and passed >= 800, res.stdout[-6000:] + res.stderr[-3000:]
    assert launches == 0  # the CPU kernels ran, not the emulated CUDA ones
