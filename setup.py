"""Build script: the pure-Python package always installs; the compiled extension fdm_fast._C is optional.

fdm_fast._C holds the `cpu` and `cuda` backends (csrc/). It is built with torch.utils.cpp_extension
and ninja: the CPU kernels whenever a C++ compiler exists, the CUDA kernels when the installed torch
has CUDA and nvcc is found. A failed build prints why and leaves the torch and triton backends working;
a failed CUDA build is retried with the CPU kernels alone.

Environment variables:
  FDM_FAST_NO_EXT=1        do not build the extension at all (pure Python install)
  FDM_FAST_NO_CUDA=1       build only the CPU kernels
  TORCH_CUDA_ARCH_LIST     CUDA architectures (default "8.0;9.0+PTX": A100 and H100/H200 kernels, plus
                           PTX that newer GPUs compile at load time; without +PTX they would have no kernel)
  MAX_JOBS                 parallel compile jobs (torch.utils.cpp_extension)
  FDM_FAST_EXT_REQUIRED=1  make a failed extension build an error instead of a warning (CI)

torch must be importable at build time, so install with --no-build-isolation (see README); pip then
installs no build requirements, and setuptools must be >= 77 (checked first, see setuptools_problem),
except for `python setup.py build_ext --inplace`, which builds the extension with an older one.
Compiler: GCC >= 11 or Clang >= 14 (the CPU kernels use C++17, or the C++20 that torch >= 2.14's headers
need, and AVX-512 intrinsics with per-function target attributes); an older one is named in the build's
message.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys

from setuptools import setup


SETUPTOOLS_MIN = (77, 0)  # pyproject.toml's `license = "MIT"` (an SPDX expression) needs setuptools >= 77


def setuptools_problem(version: str) -> str:
    """Why this setuptools cannot build fdm_fast, or '' when it can.

    The SPDX form of `project.license` replaced the `{ text = ... }` table, which setuptools >= 77 warns
    will stop building after 2027-02-18. Older setuptools (Python 3.11's venv brings 65.5) rejects the
    string with a schema error that does not say what to do; with --no-build-isolation pip does not
    install the build requirements, so this says it first. torch >= 2.13 itself requires setuptools >= 77.
    """
    m = re.match(r"(\d+)\.(\d+)", version)
    if m and (int(m.group(1)), int(m.group(2))) < SETUPTOOLS_MIN:
        return (f"setuptools {version} is too old to build fdm_fast (needs >= {SETUPTOOLS_MIN[0]}, for the SPDX "
                f"license in pyproject.toml): pip install 'setuptools>={SETUPTOOLS_MIN[0]}'")
    return ""


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _say(msg):
    print(f"fdm_fast setup: {msg}", file=sys.stderr)


def compiler_problem() -> str:
    """Why the C++ compiler is too old for csrc/ (GCC < 11, Clang < 14), or '' when it is fine or unknown.

    The compiler's own preprocessor says what it is (__clang_major__, else __GNUC__): a --version line
    is not that reliable (coreutils' programs also name the Free Software Foundation there).
    """
    cxx = os.environ.get("CXX", "c++")
    try:
        r = subprocess.run([*shlex.split(cxx), "-E", "-P", "-x", "c++", "-"], input="fdm_clang __clang_major__\n"
                           "fdm_gcc __GNUC__\n", capture_output=True, text=True, timeout=60)
    except Exception:
        return ""
    if r.returncode != 0:
        return ""  # not a compiler this can ask; the build's own error will say more
    m = re.search(r"^fdm_clang (\d+)", r.stdout, re.M)
    if m:
        return f"{cxx} is Clang {m.group(1)}; the CPU kernels need Clang >= 14" if int(m.group(1)) < 14 else ""
    m = re.search(r"^fdm_gcc (\d+)", r.stdout, re.M)
    if m and int(m.group(1)) < 11:
        return f"{cxx} is GCC {m.group(1)}; the CPU kernels need GCC >= 11 (set CXX to a newer compiler)"
    return ""


def cuda_problem(torch_cuda, nvcc) -> str:
    """Why nvcc cannot build CUDA kernels for this torch, or '' when it can (or nvcc's version is unknown).

    torch.utils.cpp_extension refuses a CUDA toolkit whose major version differs from the one torch was
    built with (a pip torch for CUDA 12.4 with a system CUDA 13, say), and it does so before any
    compile, so it is checked here and the build falls back to the CPU kernels instead of failing.
    """
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except Exception:
        return ""
    m = re.search(r"release (\d+)\.(\d+)", out)
    if not m or not torch_cuda:
        return ""
    if int(m.group(1)) != int(str(torch_cuda).split(".")[0]):
        return (f"nvcc ({nvcc}) is CUDA {m.group(1)}.{m.group(2)} but this torch was built for CUDA {torch_cuda}; "
                f"set CUDA_HOME to a CUDA {str(torch_cuda).split('.')[0]}.x toolkit to build the CUDA kernels")
    return ""


def cuda_headers_problem(cuda_home) -> str:
    """Why CUDA_HOME cannot compile CUDA kernels (no include/cuda_runtime.h), or '' when it can.

    torch.utils.cpp_extension takes CUDA_HOME from the nvcc on PATH when the variable is unset: a
    wrapper script in /usr/local/bin gives CUDA_HOME=/usr/local, and every compile then fails on
    cuda_runtime.h (seen here), the CPU kernels' included.
    """
    if cuda_home and not os.path.exists(os.path.join(cuda_home, "include", "cuda_runtime.h")):
        return (f"CUDA_HOME={cuda_home} has no include/cuda_runtime.h; set CUDA_HOME to the CUDA toolkit "
                "(the folder with bin/nvcc and include/, e.g. /usr/local/cuda) to build the CUDA kernels")
    return ""


def extension_build():
    """(ext_modules, cmdclass) for fdm_fast._C, or ([], {}) when it is skipped."""
    if _flag("FDM_FAST_NO_EXT"):
        _say("FDM_FAST_NO_EXT is set: installing without the compiled extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as e:  # torch missing in an isolated build environment
        _say(f"torch is not importable at build time ({e}); installing without the compiled extension "
             "(install torch first and use pip's --no-build-isolation to build it)")
        return [], {}

    here = os.path.dirname(os.path.abspath(__file__))
    sources = ["csrc/bindings.cpp", "csrc/module.cpp", "csrc/cpu/ops_cpu.cpp"]
    # at::parallel_for needs OpenMP. No -std: torch.utils.cpp_extension adds the standard its own headers
    # need (C++17 up to torch 2.9, C++20 in 2.13; torch 2.14's ATen.h refuses anything older than C++20).
    cxx = ["-O3", "-fno-math-errno", "-fopenmp"]
    # the nvcc torch.utils.cpp_extension will run: CUDA_HOME's, else the one on PATH
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    nvcc_found = bool(nvcc) and os.path.exists(nvcc)
    mismatch = (cuda_problem(torch.version.cuda, nvcc) or cuda_headers_problem(CUDA_HOME)) \
        if nvcc_found and torch.version.cuda else ""
    with_cuda = not _flag("FDM_FAST_NO_CUDA") and torch.version.cuda is not None and nvcc_found and not mismatch
    if _flag("FDM_FAST_NO_CUDA"):
        _say("FDM_FAST_NO_CUDA is set: building the CPU kernels only")
    elif torch.version.cuda is None:
        _say("this torch has no CUDA: building the CPU kernels only")
    elif not nvcc_found:
        _say("nvcc not found: building the CPU kernels only")
    elif mismatch:
        _say(f"WARNING: {mismatch}. Building the CPU kernels only")
    include = [os.path.join(here, "csrc", "include")]  # copied into each Extension: torch extends its lists in place
    # libstdc++ linked as the shared library torch itself uses, even by a compiler (or wrapper) that links it
    # statically by default: with its own copy of the C++ exception runtime in fdm_fast._C, the H200 machine's
    # /opt/gcc g++ produced an extension whose argument errors (c10::ValueError) crashed the process instead
    # of raising; an explicit -lstdc++ ahead of the driver's own resolves those symbols to the shared library
    # (benchmarks/ext_probe.py; tests/test_extension.py::test_extension_uses_the_shared_cxx_runtime)
    link = ["-fopenmp", "-lstdc++"]

    def cpu_only():
        return CppExtension("fdm_fast._C", sources, extra_compile_args={"cxx": list(cxx)}, extra_link_args=list(link),
                            include_dirs=list(include))

    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        _say(f"building the CUDA kernels for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
        ext = CUDAExtension("fdm_fast._C", sources + ["csrc/cuda/ops_cuda.cu"], define_macros=[("FDM_WITH_CUDA", None)],
                            extra_compile_args={"cxx": list(cxx), "nvcc": ["-O3", "-lineinfo"]},
                            extra_link_args=list(link), include_dirs=list(include))
    else:
        ext = cpu_only()

    class OptionalBuildExt(BuildExtension):
        """A failed compile says so and leaves the pure-Python backends installed."""

        # build_extensions, not build_extension: torch's own checks (the compiler, the CUDA version) run
        # there, before any compile, and a failure in them must fall back the same way
        def build_extensions(self):
            old = compiler_problem()
            if old:
                _say(f"WARNING: {old}; the build below is expected to fail")
            why = f" (likely cause: {old})" if old else ""
            try:
                super().build_extensions()
            except Exception as e:
                if _flag("FDM_FAST_EXT_REQUIRED"):
                    raise RuntimeError(f"building {ext.name} failed{why}: {e}") from e
                if not with_cuda:
                    return self._give_up(e, why)
                _say(f"WARNING: building the CUDA kernels failed ({type(e).__name__}: {e}); "
                     "retrying with the CPU kernels only")
                self._build_cpu_only(why)

        def _build_cpu_only(self, why):
            # the CUDA part (nvcc, its host compiler, an architecture it does not know) must not cost the
            # CPU kernels: build them alone, into the same extension object (setuptools has registered it),
            # with torch's compile hooks undone so they are installed once, not twice
            vars(ext).update(vars(cpu_only()))
            for hook in ("compile", "_compile"):
                vars(self.compiler).pop(hook, None)
            try:
                super().build_extensions()
            except Exception as e:
                return self._give_up(e, why)
            _say("built the CPU kernels only: the cuda backend is unavailable, the cpu, torch and triton "
                 "backends work")

        def _give_up(self, e, why):
            _say(f"WARNING: building {ext.name} failed{why} ({type(e).__name__}: {e}); the torch and triton "
                 "backends still work, the cpu/cuda backends are unavailable")
            # nothing was built: the in-place/editable copy of the .so and the install list must skip it
            self.extensions = []

    return [ext], {"build_ext": OptionalBuildExt.with_options(use_ninja=shutil.which("ninja") is not None)}


if __name__ == "__main__":  # as pip's build backend and `python setup.py` run it; tests import the helpers
    import setuptools

    why = setuptools_problem(setuptools.__version__)
    kwargs = {}
    if why and sys.argv[1:2] == ["build_ext"]:
        # Building the extension in place needs none of the project's metadata, only pyproject.toml's
        # license field is what this setuptools rejects: point its project root at an empty folder so that
        # it does not read pyproject.toml (a GPU image's torch may come with setuptools < 77).
        import atexit
        import tempfile

        kwargs["src_root"] = tempfile.mkdtemp(prefix="fdm_fast_setup_")
        atexit.register(shutil.rmtree, kwargs["src_root"], ignore_errors=True)
        # the in-place copy goes to the package folder by its absolute path (else under src_root)
        kwargs["package_dir"] = {"fdm_fast": os.path.join(os.path.dirname(os.path.abspath(__file__)), "fdm_fast")}
        _say(f"{why}; `build_ext` does not need the project's metadata: building without reading pyproject.toml")
    elif why:
        sys.exit(f"fdm_fast setup: {why}")
    ext_modules, cmdclass = extension_build()
    setup(ext_modules=ext_modules, cmdclass=cmdclass, **kwargs)
