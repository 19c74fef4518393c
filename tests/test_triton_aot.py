"""Every Triton kernel compiles to cubins for A100, H100/H200 and B200, checked without a GPU
(tests/triton_aot.py).

The rest of the suite runs the kernels in Triton's interpreter, which executes their Python bodies
with numpy and never compiles them; these tests lower every specialisation a caller can reach
through Triton's real pipeline to PTX and ptxas. The second test shows the gap is real: a kernel the
interpreter runs happily (it calls a Python builtin) fails here.
"""

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import HAS_TRITON

HERE = Path(__file__).resolve().parent
KERNELS = ("_perturb_kernel", "_randn_kernel", "_loss_fwd_kernel", "_loss_bwd_kernel", "_scale_grad_kernel",
           "_churn_kernel", "_euler_kernel", "_heun_kernel", "_multistep_kernel")


def _nvidia_backend():
    try:
        return importlib.util.find_spec("triton.backends.nvidia.compiler") is not None
    except Exception:
        return False


pytestmark = pytest.mark.skipif(not (HAS_TRITON and _nvidia_backend()),
                                reason="needs Triton with its NVIDIA backend (ptxas ships with it)")


def _start(args, tmp_path, code=None, interpret=False, cache="triton-cache"):
    """tests/triton_aot.py with ``args``, or ``code`` (a script: @triton.jit needs a source file), started."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["TRITON_CACHE_DIR"] = str(tmp_path / cache)  # compile from scratch, never from a cache hit
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent), env.get("PYTHONPATH", "")])
    script = HERE / "triton_aot.py"
    if code is not None:
        script = tmp_path / f"script_{len(list(tmp_path.glob('script_*.py')))}.py"
        script.write_text(code)
        args = []
    return subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _finish(proc):
    try:
        out, err = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _run(args, tmp_path, code=None, interpret=False):
    return _finish(_start(args, tmp_path, code, interpret))


def _triton_version():
    import triton
    return tuple(int(v) for v in re.findall(r"\d+", triton.__version__)[:2])


# A100, H100/H200, B200; Triton before 3.3 (torch 2.6's 3.2) has no Blackwell target: its ptxas
# refuses sm_100
ARCHS = (80, 90, 100) if HAS_TRITON and _triton_version() >= (3, 3) else (80, 90)


def test_every_triton_kernel_compiles_for_ampere_hopper_and_blackwell(tmp_path):
    # one process per target, side by side (each compiles single-threaded; ptxas runs between)
    procs = [_start(["--arch", str(a)], tmp_path, cache=f"triton-cache-{a}") for a in ARCHS]
    results = [_finish(p) for p in procs]
    out = "".join(r.stdout + r.stderr for r in results)
    assert all(r.returncode == 0 for r in results), out[-6000:]
    # one table per target, each headed "sm_N: K distinct kernels compiled to cubin"
    stdout = "".join(r.stdout for r in results)
    parts = re.split(r"^sm_(\d+): (\d+) distinct kernels compiled to cubin.*$", stdout, flags=re.M)[1:]
    tables = {int(parts[i]): (int(parts[i + 1]), parts[i + 2]) for i in range(0, len(parts), 3)}
    assert sorted(tables) == sorted(ARCHS), out[-3000:]
    for arch, (n, table) in tables.items():
        rows = [line.split() for line in table.splitlines() if line.startswith("_")]
        assert len(rows) == n and n >= 80, f"sm_{arch}\n" + out[-3000:]  # every specialisation family compiled
        assert sorted({r[0] for r in rows}) == sorted(KERNELS), f"sm_{arch}\n" + out[-3000:]
        assert all(int(r[1]) > 0 for r in rows), f"sm_{arch}: ptxas gave no register count\n" + out[-3000:]
        # the launches exercise the GPU's real configurations: 4-warp full tiles and a partial one-warp tile
        assert {int(r[4]) for r in rows} >= {1, 4}, out[-3000:]


# A kernel Triton's interpreter runs (it executes the body as Python) but the compiler refuses.
BAD_KERNEL = """
@triton.jit
def bad(x_ptr, N, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < N) * abs(2.0), mask=i < N)  # a Python builtin
"""


def test_a_kernel_only_the_interpreter_accepts_fails_the_check(tmp_path):
    code = "import sys\nimport torch, triton, triton.language as tl\n" + BAD_KERNEL + textwrap.dedent("""
        import triton_aot as A
        from triton.backends.compiler import GPUTarget
        from triton.runtime import driver
        from triton.runtime.jit import JITFunction

        @triton.jit
        def good(x_ptr, N, BLOCK: tl.constexpr):
            i = tl.arange(0, BLOCK)
            tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < N) * 2.0, mask=i < N)

        JITFunction.run = A._compile_only(JITFunction.run)
        driver.set_active(A.TargetOnlyDriver(GPUTarget("cuda", 90, 32)))
        x = torch.ones(8)
        good[(1,)](x, 8, BLOCK=8)
        assert "cubin" in A.COMPILED[-1][1].asm
        try:
            bad[(1,)](x, 8, BLOCK=8)
        except triton.compiler.errors.CompilationError as e:
            print("refused:", str(e).splitlines()[-1])
            sys.exit(0)
        sys.exit("the broken kernel compiled")
    """)
    res = _run([], tmp_path, code=code)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "abs" in res.stdout
    # and the interpreter, which the rest of the suite uses, runs the same kernel without complaint
    interp = _run([], tmp_path, interpret=True, code="import torch, triton, triton.language as tl\n" + BAD_KERNEL
                  + textwrap.dedent("""
        x = torch.ones(8)
        bad[(1,)](x, 8, BLOCK=8)
        assert torch.equal(x, torch.full((8,), 2.0)), x
        print("interpreted fine")
    """))
    assert interp.returncode == 0 and "interpreted fine" in interp.stdout, interp.stdout + interp.stderr


OPS = ("perturb", "randn", "churn", "heun_step", "loss_fwd", "loss_bwd", "scale_grad", "euler_step", "multistep")


def test_torch_compile_sees_each_triton_kernel_write_exactly_its_outputs(tmp_path):
    # AOTAutograd's view (tests/triton_aot.py --functional): torch analyses each kernel's TTIR for the
    # buffers it writes; a miss returns an unwritten buffer from a compiled graph, an input found written
    # is cloned on every call. Checked on fake CUDA tensors for every raw op, both layouts.
    res = _run(["--functional"], tmp_path)
    assert res.returncode == 0, (res.stdout + res.stderr)[-6000:]
    rows = [line.split() for line in res.stdout.splitlines() if line.startswith("  fdm_fast_triton::")]
    assert len(rows) == 26, res.stdout
    assert {(r[0].split("::")[1], r[1]) for r in rows} == {(o, f"({lay})") for o in OPS
                                                          for lay in ("contiguous", "channels_last")}
    assert "every kernel writes exactly its outputs" in res.stdout


# torch's analysis of a kernel's writes, replaced: "all" is what torch falls back to when the analysis
# fails (every tensor argument written), "drop" misses the network-input buffer of every kernel that has one
BROKEN_ANALYSIS = """
import sys
import torch
import torch._higher_order_ops.triton_kernel_wrap as twk
import triton_aot

real = twk.get_mutated_tensors
def patched(kernel_idx, constant_args_idx, kwargs, *rest):
    if HOW == "all":
        return [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    return [k for k in real(kernel_idx, constant_args_idx, kwargs, *rest) if k != "net_ptr"]
twk.get_mutated_tensors = patched
sys.exit(triton_aot.main(["--functional"]))
"""


@pytest.mark.parametrize("how,says", [("all", "writes its input"), ("drop", "output net_ptr not found written")])
def test_the_functional_view_fails_on_a_wrong_write_analysis(tmp_path, how, says):
    import torch._higher_order_ops.triton_kernel_wrap as twk
    if not hasattr(twk, "get_mutated_tensors"):
        pytest.skip("this torch has no get_mutated_tensors to replace")
    res = _run([], tmp_path, code=f"HOW = {how!r}\n" + BROKEN_ANALYSIS)
    assert res.returncode == 1, (res.stdout + res.stderr)[-4000:]
    assert says in res.stdout and "failure(s)" in res.stdout, res.stdout[-4000:]
