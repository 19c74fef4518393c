"""Why does an argument error thrown in fdm_fast._C crash some builds? A diagnostic for the device check.

The H200 run of 2026-11-29 saw tests/test_extension.py::test_bad_input_raises_a_python_error
segfault: the first bad call (a c10::TypeError) became a Python TypeError, the second (a
c10::ValueError) killed the process; under pytest-xdist a worker died on another case. Not
reproduced with Debian's g++ 12. This script separates the hypotheses, each in its own process:

  order           which throws run, in order; a crash shows as a signal instead of "ok"
  type,value      the test's order
  value           a ValueError first: is it the kind of error, or the second throw?
  type,type,type  three throws of the kind that passed: does any second throw crash?
  aten,aten,value torch's own errors first (thrown inside libtorch), then ours

and prints what the shared object brings of the C++ runtime: its needed libraries, and whether it
defines exception-handling symbols itself (a statically linked part of libstdc++ or libgcc, as some
GCC toolsets do, gives the process two copies of the unwinder's state).

    python benchmarks/ext_probe.py
"""

from __future__ import annotations

import subprocess
import sys

CASES = {
    "type": "ext.perturb(y.long(), sigma, rng, None, *spec, torch.float32, False)",
    "value": "ext.perturb(y, torch.ones(3), rng, None, *spec, torch.float32, False)",
    "aten": "torch.ones(3).view(2)",
}

CHILD = """
import sys, torch
import fdm_fast._C
from fdm_fast import schedules
ext = torch.ops.fdm_fast_ext
spec = list(schedules.get_precond("fdm_edm").kernel_spec()); spec[2] = list(spec[2])
y, sigma, rng = torch.randn(2, 3, 8, 8), torch.ones(2), torch.tensor([[1, 0]])
for k, code in enumerate(sys.argv[1:]):
    try:
        eval(code)
        print(f"  call {k + 1}: no error raised", flush=True)
    except Exception as e:
        print(f"  call {k + 1}: {type(e).__name__} ok", flush=True)
"""


def main() -> int:
    import fdm_fast._C as C

    so = C.__file__
    print(f"extension: {so}")
    for order in ("type,value", "value", "type,type,type", "aten,aten,value"):
        codes = [CASES[c] for c in order.split(",")]
        r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", CHILD, *codes], capture_output=True, text=True,
                           timeout=120)
        status = "exit 0" if r.returncode == 0 else (f"signal {-r.returncode}" if r.returncode < 0 else
                                                      f"exit {r.returncode}")
        print(f"{order}: {status}")
        print(r.stdout.rstrip())
        if r.returncode:
            print("\n".join("  | " + line for line in r.stderr.strip().splitlines()[-12:]))
    for cmd in (["ldd", so], ["readelf", "-d", so], ["readelf", "-p", ".comment", so]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
            keep = [line for line in out.splitlines() if any(s in line for s in ("NEEDED", "c++", "gcc", "GCC", "clang",
                                                                                   "libstdc", "libgcc", "omp"))]
            print(f"$ {' '.join(cmd[:2])} ...\n" + "\n".join("  " + line.strip() for line in keep[:20]))
        except (OSError, subprocess.TimeoutExpired) as e:
            print(f"$ {cmd[0]}: {e}")
    try:  # exception-runtime symbols the .so defines itself (not just uses)
        out = subprocess.run(["nm", "-D", "--defined-only", so], capture_output=True, text=True, timeout=60).stdout
        mine = [line.split()[-1] for line in out.splitlines()
                if any(s in line for s in ("__cxa_", "_Unwind_", "__gxx_personality", "_ZTVN10__cxxabiv", "__once_"))]
        print(f"exception-runtime symbols defined in the .so: {len(mine)} {mine[:12]}")
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"$ nm: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
