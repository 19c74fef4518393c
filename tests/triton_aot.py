"""Compile every Triton kernel of fdm_fast for a GPU, on a machine without one.

The Triton interpreter (TRITON_INTERPRET=1, how the suite runs kernels here) executes kernel bodies
with numpy and never lowers them: a kernel that does not type-check, does not lower to PTX or does
not assemble with ptxas still passes every interpreted test. This script closes that gap. It runs
with the interpreter off, replaces Triton's active driver by one that only names a GPU target, and
makes every kernel launch a compile-only ``warmup``; then it calls the public ``fdm_fast.ops``
functions with ``backend="triton"`` over the specialisations a caller can reach (every op; contiguous,
channels_last, 2-D and misaligned inputs; fp32/bf16/fp16 networks; every preconditioning kind;
drawn, shared-row and stored noise; multistep with 0-4 stored tensors, guidance, keep and net
outputs). Each launch goes through Triton's full pipeline (TTIR, TTGIR, LLVM IR, PTX, and ptxas to
a cubin for the target). Nothing is executed, so no output is checked here; the values are the
interpreted tests' job.

    python tests/triton_aot.py                  # sm_90 (H100/H200); a table of every compiled kernel
    python tests/triton_aot.py --arch 80 90 100 # also A100 and B200
    python tests/triton_aot.py --functional     # torch.compile's view of every Triton op (below)

Prints one row per compiled specialisation: kernel, registers, spill bytes (from ``ptxas -v``),
shared memory, warps. Exits 1 and names the call when a kernel fails to compile.
tests/test_triton_aot.py runs it in CI with the installed Triton; run it with the GPU machine's Triton
version to check that one too (a Triton version is all it needs: no GPU, no CUDA toolkit).

``--functional`` checks what torch.compile sees instead of what Triton compiles. AOTAutograd traces a
``torch.library.triton_op`` into its body and each kernel launch into a functional wrapper whose
outputs are the buffers torch's analysis of the kernel's TTIR finds it writes; a buffer missed there
is returned unwritten from a compiled graph, an input wrongly found written is cloned each call, and
when the analysis fails torch assumes every input written. This traces every raw Triton op (the
cases of tests/test_opcheck.py, contiguous and channels_last) that way on fake CUDA tensors and checks
that each kernel is found to write exactly its output buffers: never an input, every allocated
output (zero-size placeholders of outputs not asked for excepted), and that no output of the traced
op is an allocation no kernel wrote.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

os.environ.pop("TRITON_INTERPRET", None)  # real JITFunctions, not the interpreter's (before triton loads)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver as _driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class TargetOnlyDriver:
    """What JITFunction.run asks of a driver before launching: a device, a stream, the target."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True

    def get_benchmarker(self):  # Triton 3.2's Autotuner asks for one when built; torch 2.6 wraps kernels in one
        def bench(*args, **kwargs):
            raise RuntimeError("TargetOnlyDriver runs nothing: there is nothing to time")

        return bench


COMPILED: list = []  # (kernel name, CompiledKernel) in launch order, per target


def _compile_only(run):
    def wrapped(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        if kernel is None:
            raise RuntimeError(f"{self.fn.__name__}: Triton returned no compiled kernel")
        COMPILED.append((self.fn.__name__, kernel))
        return kernel
    return wrapped


def _forget_compiled_kernels():
    """Empty every fdm_fast kernel's per-device cache: it holds the target it was first compiled for,
    so without this a second --arch would silently reuse the first one's kernels."""
    from fdm_fast.ops import triton_loss, triton_perturb, triton_sampler
    for mod in (triton_loss, triton_perturb, triton_sampler):
        for obj in vars(mod).values():
            if isinstance(obj, JITFunction):
                # Triton >= 3.3: device_caches; Triton 3.2 (torch 2.6's): cache, {device: {key: kernel}}
                (obj.device_caches if hasattr(obj, "device_caches") else obj.cache).clear()


def _allow_triton_on_cpu_tensors():
    # the dispatcher hands CPU tensors to triton only under the interpreter; here the kernels only
    # compile, so let them through (the flag is read per call)
    from fdm_fast.ops import _backends
    _backends._interpreter = lambda: True


def calls():
    """(label, thunk) for every specialisation family of every op; each thunk makes one or more launches."""
    from fdm_fast import ops

    T = dict(backend="triton")
    g = torch.Generator().manual_seed(0)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    def cl(t):
        return t.contiguous(memory_format=torch.channels_last)

    B = 2  # 3x32x32 samples: the full tiles of real images (1024 elements, 4 warps), as on a GPU
    layouts = {
        "contiguous": lambda *s, dtype=torch.float32: r(*s, dtype=dtype),
        "channels_last": lambda *s, dtype=torch.float32: cl(r(*s, dtype=dtype)),
    }
    shape = (B, 3, 32, 32)
    out = []
    sig = torch.rand(B, generator=g) * 5 + 0.01
    seeds = torch.arange(B, dtype=torch.int64)
    for lay, mk in layouts.items():
        for dt in (torch.float32, torch.bfloat16, torch.float16):
            name = str(dt).split(".")[1]
            for pre in ("vp", "ve", "edm", "fdm_edm"):
                out.append((f"perturb {lay} {name} {pre}",
                            lambda mk=mk, dt=dt, pre=pre: ops.perturb(mk(*shape, dtype=dt), sig, pre, seed=seeds,
                                                                      return_x=True, **T)))
            out.append((f"loss fwd+bwd {lay} {name} fdm_vp clamp",
                        lambda mk=mk, dt=dt: _loss(ops, mk(*shape, dtype=dt).requires_grad_(), mk(*shape, dtype=dt),
                                                   sig, "fdm_vp", clamp=3.0, seed=7, **T)))
            out.append((f"loss fwd (no saved gradient)+bwd {lay} {name} fdm_edm",
                        lambda mk=mk, dt=dt: _loss_regenerating(mk(*shape, dtype=dt).requires_grad_(),
                                                                mk(*shape, dtype=dt), sig, "fdm_edm", seeds)))
            out.append((f"euler {lay} net {name}",
                        lambda mk=mk, dt=dt: ops.euler_step(mk(*shape), mk(*shape, dtype=dt), sig, sig * 0.5, "edm",
                                                            net_dtype=dt, **T)))
            out.append((f"multistep {lay} F {name} K=2 keep net",
                        lambda mk=mk, dt=dt: ops.multistep(mk(*shape), mk(*shape, dtype=dt), c_skip=0.3, c_out=sig,
                                                           a=0.5, b=0.5, history=[mk(*shape), mk(*shape)], h=[0.1, 0.2],
                                                           c_in_next=0.7, keep=(0.0, 1.0), net_dtype=dt, **T)))
        out += [
            (f"perturb {lay} stored noise", lambda mk=mk: ops.perturb(mk(*shape), sig, "fdm_ve", noise=mk(*shape), **T)),
            (f"perturb {lay} shared seed", lambda mk=mk: ops.perturb(mk(*shape), 1.5, "edm", seed=3, offset=8, **T)),
            (f"loss {lay} stored noise, no clamp, none",
             lambda mk=mk: ops.denoise_loss(mk(*shape), mk(*shape), sig, "edm", noise=mk(*shape), reduction="none", **T)),
            (f"churn {lay} per-sample seeds", lambda mk=mk: ops.churn(mk(*shape), sig, sig * 1.1, "edm", seed=seeds, **T)),
            (f"churn {lay} stored noise", lambda mk=mk: ops.churn(mk(*shape), sig, sig * 1.1, "fdm_vp", noise=mk(*shape),
                                                                  **T)),
            (f"churn {lay} no noise", lambda mk=mk: ops.churn(mk(*shape), 2.0, 2.0, "ve", **T)),
            (f"heun {lay}", lambda mk=mk: ops.heun_step(mk(*shape), mk(*shape), mk(*shape), sig, sig * 0.5, "edm", **T)),
            (f"heun {lay} fused churn", lambda mk=mk: ops.heun_step(mk(*shape), mk(*shape), mk(*shape), sig, sig * 0.5,
                                                                    "fdm_edm", t_hat_next=sig * 0.55, seed=seeds, **T)),
            (f"euler {lay} to sigma 0, x only", lambda mk=mk: ops.euler_step(mk(*shape), mk(*shape), 0.5, 0.0, "vp",
                                                                            return_d=False, **T)),
            (f"randn {lay}", lambda: ops.randn(shape, seed=seeds, offset=4, **T)),
        ]
        for K in range(5):
            hist = [layouts[lay](*shape) for _ in range(K)]
            out.append((f"multistep {lay} K={K} guided, sde noise (per-sample seeds)",
                        lambda mk=mk, hist=hist, K=K: ops.multistep(
                            mk(*shape), mk(*shape), G=mk(*shape), c_skip=0.2, c_out=1.5, w_G=-0.5, a=0.9, b=0.1,
                            history=hist, h=[0.1] * K, noise_scale=0.3, seed=seeds, offset=12, c_in_next=sig, **T)))
        out += [
            (f"multistep {lay} no F (unipc predictor)",
             lambda mk=mk: ops.multistep(mk(*shape), a=0.5, history=[mk(*shape)] * 3, h=[0.1, 0.2, 0.3], c_in_next=0.4,
                                         **T)),
            (f"multistep {lay} stored noise, keep slope",
             lambda mk=mk: ops.multistep(mk(*shape), mk(*shape), c_skip=0.1, c_out=0.9, a=0.5, b=0.5, noise=mk(*shape),
                                         noise_scale=sig, keep=(0.5, -0.5), **T)),
        ]
    # rank 2 and 3, an odd sample size (no 4-aligned counters), a view starting off a 16-byte boundary
    odd = r(B + 1, 5, 7)[1:]
    out += [
        ("perturb 2-D", lambda: ops.perturb(r(B, 33), sig, "edm", seed=seeds, **T)),
        ("perturb 3-D odd, misaligned view, shared seed", lambda: ops.perturb(odd, sig, "fdm_vp", seed=5, **T)),
        ("loss 3-D odd, misaligned view", lambda: _loss(ops, r(B, 5, 7).requires_grad_(), odd, sig, "vp", seed=5, **T)),
        ("multistep 3-D odd, misaligned view, shared-seed noise",
         lambda: ops.multistep(odd, odd, c_skip=0.5, c_out=0.5, a=1.0, b=0.1, noise_scale=0.2, seed=9, c_in_next=1.0,
                               **T)),
        ("channels_last C=5 (padded channel tile)",
         lambda: ops.multistep(cl(r(B, 5, 6, 6)), cl(r(B, 5, 6, 6)), c_skip=0.5, c_out=0.5, noise_scale=0.1, seed=seeds,
                               c_in_next=1.0, **T)),
        ("small samples (3x4x4: one warp, a partial tile)",
         lambda: ops.heun_step(r(B, 3, 4, 4), r(B, 3, 4, 4), r(B, 3, 4, 4), 1.0, 0.5, "edm", t_hat_next=0.6,
                               seed=1, **T)),
    ]
    return out


def _loss(ops, F, y, sigma, pre, **kw):
    loss = ops.denoise_loss(F, y, sigma, pre, **kw)
    loss.backward()
    return loss


def _loss_regenerating(F, y, sigma, pre, seeds):
    """The raw op's backward when its forward kept no gradient: loss_bwd, which draws the noise again."""
    from fdm_fast import schedules
    from fdm_fast.ops import triton_loss

    kind, fdm, params = schedules.get_precond(pre).kernel_spec()
    rng = torch.stack([seeds, torch.zeros_like(seeds)], dim=1)
    per_sample, _ = triton_loss.loss_fwd(F, y, sigma.float(), rng, None, torch.tensor([3.0]), kind, fdm, list(params),
                                         False)
    per_sample.sum().backward()
    return per_sample


def functional_view(arch: int = 90) -> int:
    """Failures of --functional (see the module docstring), after a row per traced case."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils._pytree import tree_flatten, tree_unflatten

    # the kernels must be real JITFunctions: load them before test_opcheck's conftest sets TRITON_INTERPRET
    from fdm_fast.ops import triton_loss, triton_perturb, triton_sampler  # noqa: F401
    import test_opcheck

    _driver.set_active(TargetOnlyDriver(GPUTarget("cuda", arch, 32)))  # the TTIR is made for a target
    mode = FakeTensorMode()
    allocs = {"empty", "empty_strided", "new_empty", "empty_like", "new_empty_strided"}

    def is_alloc(node):
        return node.op == "call_function" and getattr(node.target, "__name__", "").split(".")[0] in allocs

    failures = 0
    print(f"torch.compile's view of the Triton ops (triton {triton.__version__}, torch {torch.__version__}, "
          f"TTIR for sm_{arch}):")
    for layout in ("contiguous", "channels_last"):
        for op, args in test_opcheck._cases("fdm_fast_triton", "cpu", layout == "channels_last"):
            # every tensor argument (lists of them too) as the same shape, strides and dtype on a fake CUDA
            # device (no GPU, any torch build); the traced function takes those tensors and puts them back
            leaves, spec = tree_flatten(list(args))
            where = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
            with mode:
                flat = [torch.empty_strided(leaves[i].shape, leaves[i].stride(), dtype=leaves[i].dtype,
                                            device="cuda") for i in where]

            def call(*ts, leaves=leaves, spec=spec, where=where, op=op):
                filled = list(leaves)
                for i, t in zip(where, ts):
                    filled[i] = t
                return op(*tree_unflatten(filled, spec))

            label = f"{op._qualified_op_name if hasattr(op, '_qualified_op_name') else op} ({layout})"
            try:
                with mode:
                    gm = make_fx(dispatch_functionalize(call), tracing_mode="real")(*flat)
            except Exception:
                failures += 1
                print(f"FAILED {label}: not traceable\n{traceback.format_exc()}", file=sys.stderr)
                continue
            problems, written = [], []
            wrapper = torch.ops.higher_order.triton_kernel_wrapper_functional
            launches = [n for n in gm.graph.nodes if n.target is wrapper]
            if not launches:
                problems.append("no kernel launch in the traced graph")
            for n in launches:
                bufs = {k: v for k, v in n.kwargs["kwargs"].items() if isinstance(v, torch.fx.Node)}
                clone = set(n.kwargs["tensors_to_clone"])
                written.append(sorted(clone))
                problems += [f"writes its input {k}" for k in sorted(clone) if bufs[k].op == "placeholder"]
                problems += [f"output {k} not found written" for k, v in bufs.items()
                             if is_alloc(v) and k not in clone and v.meta["val"].numel() > 0]
            outs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
            for o in (outs if isinstance(outs, (tuple, list)) else [outs]):
                if isinstance(o, torch.fx.Node) and is_alloc(o) and o.meta["val"].numel() > 0:
                    problems.append(f"returns {o.name}, an allocation no kernel wrote")
            print(f"  {label:<46} writes {written}" + (f"  FAILED: {'; '.join(problems)}" if problems else ""))
            failures += bool(problems)
    return failures


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers, spill bytes and shared memory from ``ptxas -v`` on the kernel's PTX."""
    from triton.backends.nvidia import compiler
    if hasattr(compiler, "get_ptxas"):  # Triton >= 3.3
        # seen: 3.3.1 get_ptxas(arch) -> (path, version), an lru_cache wrapper (no __code__); 3.5.1
        # get_ptxas() -> a tool with .path; 3.9.0 get_ptxas(arch) -> a tool with .path
        get_ptxas = compiler.get_ptxas
        tool = get_ptxas(arch) if inspect.signature(get_ptxas).parameters else get_ptxas()
        ptxas = tool.path if hasattr(tool, "path") else tool[0]
    else:  # Triton 3.2 (torch 2.6's)
        ptxas = compiler._path_to_binary("ptxas")[0]
    gpu = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)  # sm_90a for Hopper
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True)
    text = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = [int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    return dict(regs=int(regs.group(1)) if regs else -1, spill=sum(spills))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", type=int, default=[90], help="compute capabilities (default: 90)")
    ap.add_argument("--only", default="", help="only the calls whose label contains this text")
    ap.add_argument("--no-ptxas-report", action="store_true", help="skip the registers/spills column")
    ap.add_argument("--functional", action="store_true",
                    help="instead of compiling: torch.compile's (AOTAutograd's) view of every Triton op, which "
                         "buffers each kernel is found to write (module docstring)")
    args = ap.parse_args(argv)
    if args.functional:
        failures = functional_view(args.arch[0])
        print(f"\n{failures} failure(s)" if failures else "\nevery kernel writes exactly its outputs")
        return 1 if failures else 0

    JITFunction.run = _compile_only(JITFunction.run)
    _allow_triton_on_cpu_tensors()
    print(f"triton {triton.__version__}, torch {torch.__version__}; targets: "
          + ", ".join(f"sm_{a}" for a in args.arch))
    failures = 0
    for arch in args.arch:
        _driver.set_active(TargetOnlyDriver(GPUTarget("cuda", arch, 32)))
        _forget_compiled_kernels()
        seen = {}
        t0 = time.time()
        for label, thunk in calls():
            if args.only not in label:
                continue
            n0 = len(COMPILED)
            try:
                thunk()
            except Exception:
                failures += 1
                print(f"FAILED sm_{arch}: {label}\n{traceback.format_exc()}", file=sys.stderr)
                continue
            for name, k in COMPILED[n0:]:
                target = re.search(r"^\.target\s+sm_(\d+)", k.asm.get("ptx", ""), re.M)
                if "cubin" not in k.asm or not target or int(target.group(1)) != arch:
                    failures += 1
                    print(f"FAILED sm_{arch}: {label}: {name} produced no cubin for sm_{arch} (PTX target: "
                          f"{target.group(0) if target else 'none'})", file=sys.stderr)
                key = (name, k.hash)
                if key not in seen:
                    seen[key] = (label, k)
        print(f"\nsm_{arch}: {len(seen)} distinct kernels compiled to cubin in {time.time() - t0:.1f} s")
        print(f"{'kernel':<20} {'regs':>5} {'spill B':>8} {'smem':>6} {'warps':>5}  first reached by")
        for (name, _), (label, k) in seen.items():
            use = dict(regs="-", spill="-") if args.no_ptxas_report else ptxas_usage(k.asm["ptx"], arch)
            print(f"{name:<20} {use['regs']:>5} {use['spill']:>8} {k.metadata.shared:>6} {k.metadata.num_warps:>5}  "
                  f"{label}")
    if failures:
        print(f"\n{failures} failure(s)", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
