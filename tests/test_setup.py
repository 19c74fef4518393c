"""setup.py's fallbacks: a build that cannot make the extension (or its CUDA part) says why and installs the
pure-Python backends, unless FDM_FAST_EXT_REQUIRED asks for an error."""

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("fdm_fast_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # __name__ is not "__main__": nothing is built
    return mod


def _nvcc(tmp_path, release):
    p = tmp_path / "nvcc"
    p.write_text("#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\n"
                 f"echo 'Cuda compilation tools, release {release}, V{release}.48'\n")
    p.chmod(0o755)
    return str(p)


def test_a_cuda_toolkit_of_another_major_version_is_named_and_skipped(setup_py, tmp_path):
    # torch.utils.cpp_extension raises on this before compiling anything (seen with torch 2.6.0+cu124
    # beside nvcc 13.0): the build must fall back to the CPU kernels, not fail the install
    why = setup_py.cuda_problem("12.4", _nvcc(tmp_path, "13.0"))
    assert "is CUDA 13.0 but this torch was built for CUDA 12.4" in why
    assert "set CUDA_HOME to a CUDA 12.x toolkit" in why


@pytest.mark.parametrize("torch_cuda,release", [("13.0", "13.0"), ("12.4", "12.8"), ("12.8", "12.4")])
def test_the_same_major_cuda_version_builds(setup_py, tmp_path, torch_cuda, release):
    # torch only warns about a minor-version difference, and such builds load
    assert setup_py.cuda_problem(torch_cuda, _nvcc(tmp_path, release)) == ""


def test_an_nvcc_that_cannot_say_its_version_is_left_to_torch(setup_py, tmp_path):
    assert setup_py.cuda_problem("12.4", str(tmp_path / "missing-nvcc")) == ""
    odd = tmp_path / "odd"
    odd.write_text("#!/bin/sh\necho 'something else'\n")
    odd.chmod(0o755)
    assert setup_py.cuda_problem("12.4", str(odd)) == ""



def test_a_cuda_home_without_headers_is_named_and_skipped(setup_py, tmp_path):
    # torch derives CUDA_HOME=/usr/local from a /usr/local/bin/nvcc wrapper script: no headers there
    why = setup_py.cuda_headers_problem(str(tmp_path))
    assert f"CUDA_HOME={tmp_path} has no include/cuda_runtime.h; set CUDA_HOME to the CUDA toolkit" in why
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda_runtime.h").write_text("")
    assert setup_py.cuda_headers_problem(str(tmp_path)) == ""
    assert setup_py.cuda_headers_problem(None) == ""

@pytest.mark.parametrize("required", [False, True])
def test_a_failure_in_torchs_pre_build_checks_falls_back_unless_required(setup_py, monkeypatch, capsys, required):
    """torch's BuildExtension checks the compiler and CUDA version in build_extensions, before the
    per-extension build: a failure there takes the same path as a failed compile."""
    pytest.importorskip("torch")
    from torch.utils import cpp_extension

    monkeypatch.setenv("FDM_FAST_NO_CUDA", "1")
    monkeypatch.setenv("FDM_FAST_EXT_REQUIRED", "1" if required else "0")
    ext_modules, cmdclass = setup_py.extension_build()
    assert [e.name for e in ext_modules] == ["fdm_fast._C"]

    def refuse(self):
        raise RuntimeError("The detected CUDA version (13.0) mismatches the version ... (12.4)")

    monkeypatch.setattr(cpp_extension.BuildExtension, "build_extensions", refuse)
    cls = cmdclass["build_ext"]
    cmd = cls.__new__(cls)  # only build_extensions is called: no distribution needed
    cmd.extensions = list(ext_modules)
    if required:
        with pytest.raises(RuntimeError, match=r"building fdm_fast._C failed: The detected CUDA version"):
            cmd.build_extensions()
    else:
        cmd.build_extensions()
        err = capsys.readouterr().err
        assert "WARNING: building fdm_fast._C failed (RuntimeError: The detected CUDA version" in err
        assert "the torch and triton backends still work" in err
        # nothing was built, so an in-place or editable install must not try to copy the .so
        # (it failed with "can't copy ... _C...so: doesn't exist" before)
        assert cmd.extensions == []


def _fake_cxx(tmp_path, name, script):
    p = tmp_path / name
    p.write_text("#!/bin/sh\n" + script)
    p.chmod(0o755)
    return str(p)


def test_the_compiler_check_asks_the_compilers_preprocessor(setup_py, tmp_path, monkeypatch):
    # a program that prints like coreutils (it names the Free Software Foundation) is no GCC 9
    coreutils = _fake_cxx(tmp_path, "false", "echo 'false (GNU coreutils) 9.1'; echo 'Copyright (C) 2022 Free "
                          "Software Foundation, Inc.'; exit 1\n")
    # the compilers' preprocessors expand the probe's macros: old ones are named
    gcc9 = _fake_cxx(tmp_path, "g++-9", "cat > /dev/null; echo 'fdm_clang __clang_major__'; echo 'fdm_gcc 9'\n")
    clang12 = _fake_cxx(tmp_path, "clang++-12", "cat > /dev/null; echo 'fdm_clang 12'; echo 'fdm_gcc 4'\n")
    clang17 = _fake_cxx(tmp_path, "clang++-17", "cat > /dev/null; echo 'fdm_clang 17'; echo 'fdm_gcc 4'\n")
    for cxx, want in [(coreutils, ""), (gcc9, "is GCC 9; the CPU kernels need GCC >= 11"),
                      (clang12, "is Clang 12; the CPU kernels need Clang >= 14"), (clang17, ""),
                      (str(tmp_path / "missing"), "")]:
        monkeypatch.setenv("CXX", cxx)
        got = setup_py.compiler_problem()
        assert (want in got) if want else got == "", (cxx, got)
    gxx = shutil.which("g++")
    if gxx:  # the real thing: this machine's GCC answers, and the answer agrees with its version
        monkeypatch.setenv("CXX", gxx)
        major = int(subprocess.run([gxx, "-dumpversion"], capture_output=True, text=True).stdout.split(".")[0])
        assert (setup_py.compiler_problem() == "") == (major >= 11)


@pytest.mark.parametrize("cpu_build", ["builds", "fails", "required"])
def test_a_failed_cuda_build_is_retried_with_the_cpu_kernels(setup_py, tmp_path, monkeypatch, capsys, cpu_build):
    """nvcc can fail where the C++ compiler does not (a host compiler nvcc refuses, an architecture it
    dropped): the CPU kernels are then built alone, into the extension object setuptools registered."""
    torch = pytest.importorskip("torch")
    from torch.utils import cpp_extension

    cuda_home = tmp_path / "cuda"
    (cuda_home / "bin").mkdir(parents=True)
    (cuda_home / "include").mkdir()
    (cuda_home / "include" / "cuda_runtime.h").write_text("")
    (cuda_home / "bin" / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools, release 13.0, V13.0.48'\n")
    (cuda_home / "bin" / "nvcc").chmod(0o755)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(cuda_home))
    monkeypatch.delenv("FDM_FAST_NO_CUDA", raising=False)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    monkeypatch.setenv("FDM_FAST_EXT_REQUIRED", "1" if cpu_build == "required" else "0")
    ext_modules, cmdclass = setup_py.extension_build()
    (ext,) = ext_modules
    assert "csrc/cuda/ops_cuda.cu" in ext.sources and ("FDM_WITH_CUDA", None) in ext.define_macros

    calls = []

    def build(self):
        # what torch's BuildExtension does that matters here: hook the compiler instance, then compile
        assert "compile" not in vars(self.compiler), "torch's compile hook was left from the failed build"
        self.compiler.compile = "torch's ninja hook"
        calls.append(list(self.extensions[0].sources))
        if any(s.endswith(".cu") for s in self.extensions[0].sources):
            raise RuntimeError("nvcc fatal : Unsupported gpu architecture 'compute_50'")
        if cpu_build == "fails":
            raise RuntimeError("c++: internal compiler error")

    monkeypatch.setattr(cpp_extension.BuildExtension, "build_extensions", build)
    cls = cmdclass["build_ext"]
    cmd = cls.__new__(cls)
    cmd.extensions = list(ext_modules)
    cmd.compiler = type("Compiler", (), {})()
    if cpu_build == "required":  # CI asks for the whole extension: no quiet downgrade
        with pytest.raises(RuntimeError, match="building fdm_fast._C failed: nvcc fatal"):
            cmd.build_extensions()
        assert len(calls) == 1
        return
    cmd.build_extensions()
    err = capsys.readouterr().err
    assert "WARNING: building the CUDA kernels failed (RuntimeError: nvcc fatal : Unsupported gpu architecture" in err
    assert "retrying with the CPU kernels only" in err
    assert len(calls) == 2 and calls[1] == ["csrc/bindings.cpp", "csrc/module.cpp", "csrc/cpu/ops_cpu.cpp"]
    if cpu_build == "builds":
        assert cmd.extensions == [ext] and cmd.extensions[0] is ext  # the object setuptools finalized
        assert ("FDM_WITH_CUDA", None) not in (ext.define_macros or [])
        assert not any(str(cuda_home) in x for x in ext.include_dirs + ext.library_dirs), ext.include_dirs
        assert not any("cuda" in x for x in ext.libraries), ext.libraries
        assert "built the CPU kernels only: the cuda backend is unavailable" in err
    else:
        assert cmd.extensions == []
        assert "WARNING: building fdm_fast._C failed (RuntimeError: c++: internal compiler error)" in err


@pytest.mark.parametrize("version,ok", [("65.5.0", False), ("76.1.0", False), ("77.0.3", True), ("84.2.1", True),
                                        ("100.0.0", True), ("80.9.0.post1", True)])
def test_the_setuptools_floor_is_named(setup_py, version, ok):
    # pyproject.toml's SPDX `license = "MIT"` needs setuptools >= 77; the old `{ text = ... }` table
    # warns there that it stops building after 2027-02-18
    why = setup_py.setuptools_problem(version)
    assert (why == "") == ok, why
    if not ok:
        assert f"setuptools {version} is too old" in why and "pip install 'setuptools>=77'" in why


def test_pyproject_declares_the_license_as_spdx_and_requires_that_setuptools():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'license = "MIT"' in text and 'requires = ["setuptools>=77"' in text


def test_an_old_setuptools_stops_the_build_with_what_to_do(setup_py, tmp_path):
    """Python 3.11's venv brings setuptools 65.5, which rejects the SPDX license with a schema dump;
    setup.py says first what to install (pip's --no-build-isolation does not install build requirements).
    `setup.py build_ext --inplace` (benchmarks/gpu_check.sh's build, on an image whose torch may come with
    an older setuptools) needs no metadata and goes on without reading pyproject.toml."""
    import os
    import sys
    import venv

    venv.create(tmp_path / "v", with_pip=True)
    py = tmp_path / "v" / "bin" / "python"
    old = subprocess.run([str(py), "-c", "import setuptools; print(setuptools.__version__)"], capture_output=True,
                         text=True)
    if old.returncode != 0 or not setup_py.setuptools_problem(old.stdout.strip()):
        pytest.skip(f"this Python ({sys.version_info[:2]}) brings no setuptools < 77 into a new venv")
    r = subprocess.run([str(py), "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, FDM_FAST_NO_EXT="1"))
    assert r.returncode != 0
    assert f"setuptools {old.stdout.strip()} is too old to build fdm_fast" in r.stderr, r.stderr

    # build_ext in a copy of the project files setuptools reads (without the skip, its schema error)
    proj = tmp_path / "proj"
    (proj / "fdm_fast").mkdir(parents=True)
    for f in ("setup.py", "pyproject.toml"):
        (proj / f).write_text((ROOT / f).read_text())
    r = subprocess.run([str(py), "setup.py", "build_ext", "--inplace"], cwd=proj, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, FDM_FAST_NO_EXT="1"))
    assert r.returncode == 0, r.stderr
    assert "building without reading pyproject.toml" in r.stderr and "project.license" not in r.stderr, r.stderr
