"""The fused backends' host code on CUDA tensors, run without a GPU: no host read of a device tensor.

tests/test_sync_free.py runs the samplers, solvers and ops on the ``meta`` device, where every op takes
the ``torch`` backend, so the host code of the ``triton`` and ``cuda`` backends (argument handling,
coefficient tables, the Triton launch set-up, the ops' fake kernels) is not on that path. Here CUDA
tensors are fake tensors (shapes, strides and dtypes, no data, no GPU) while CPU tensors stay real, as
the host's own numbers (schedules, coefficients) are; torch is told a CUDA device exists. A host read
of a fake CUDA tensor (``.item()``, ``bool()``, ``float()``) raises, and test_sync_free's guard also
fails ``.tolist()``/``.cpu()`` of one and any blocking host-to-device copy. Then every sampler and
solver, and the training pair (perturb, the loss's forward), runs with the backend named. Not the
loss's backward: autograd on a CUDA tensor asks for the device (its streams), fake or not.

    python tests/fake_cuda_host.py triton     # any torch build; Triton's kernels are traced, never run
    python tests/fake_cuda_host.py cuda       # needs fdm_fast._C built with its CUDA kernels
    python tests/fake_cuda_host.py triton --value-checks   # the ops' value checks on: every run must fail

Prints a row per run and exits 1 if any failed, 77 (SKIP) if this torch cannot run a convolution on
fake CUDA tensors without a GPU. A GPU repeats this for real (benchmarks/sync_check.py under
torch.cuda.set_sync_debug_mode("error")).
"""

from __future__ import annotations

import os
import sys
import traceback

os.environ.pop("TRITON_INTERPRET", None)  # real Triton kernels (traced by torch, never launched)

import pytest  # noqa: E402
import torch  # noqa: E402
import torch._subclasses.fake_tensor as fake_tensor  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

# a CUDA device as far as the host code asks, with nothing behind it
torch.cuda.is_available = lambda: True
torch.cuda.current_device = lambda: 0
torch.cuda.device_count = lambda: 1
torch.cuda._lazy_init = lambda: None
torch.cuda.is_current_stream_capturing = lambda: False
fake_tensor.init_gpu_context = lambda *a, **k: None


def _autotuner_without_a_driver():
    """torch wraps each traced Triton kernel in an Autotuner, and Triton 3.2's and 3.3's ask the active
    driver for a benchmarker when one is built (3.8 and 3.9 ask only when timing): with no libcuda the
    NVIDIA driver cannot be made (torch 2.7.1 + Triton 3.3.1: perturb + loss failed so, and passed with
    this). One config is never timed, so a benchmarker that refuses to run will do."""
    from triton.runtime import autotuner

    init = autotuner.Autotuner.__init__

    def never_timed(*args, **kwargs):
        raise RuntimeError("fake_cuda_host: nothing is launched, so nothing is timed")

    def patched(self, *args, do_bench=None, **kwargs):
        init(self, *args, do_bench=do_bench or never_timed, **kwargs)

    autotuner.Autotuner.__init__ = patched


_autotuner_without_a_driver()

from fdm_fast import ops, sampling, solvers  # noqa: E402
from fdm_fast.ops import triton_loss, triton_perturb, triton_sampler  # noqa: E402,F401  (before conftest)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_sync_free  # noqa: E402

FAKE = FakeTensorMode(allow_non_fake_inputs=True)


def _on_cuda(a) -> bool:
    if isinstance(a, torch.Tensor):
        return a.device.type == "cuda"
    if isinstance(a, torch.device):
        return a.type == "cuda"
    return isinstance(a, str) and a.startswith("cuda")


class CudaIsFake(TorchDispatchMode):
    """Ops that touch CUDA run under the fake mode; CPU ops run for real. Counts fdm_fast's ops."""

    def __init__(self):
        super().__init__()
        self.calls: dict = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name.startswith("fdm_fast"):
            self.calls[name] = self.calls.get(name, 0) + 1
        if any(_on_cuda(a) for a in tree_flatten((args, kwargs))[0]):
            with FAKE:
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def runs(backend: str):
    """(label, thunk) for every sampler and solver, and the training pair, on fake CUDA tensors."""
    net = test_sync_free._tiny_denoiser().to_empty(device="cuda")  # built on meta, parameters made fake
    seeds = torch.zeros(4, dtype=torch.int64, device="cuda")
    out = [(f"solvers.sample(solver={s!r})", lambda s=s: solvers.sample(net, seeds, solver=s, steps=5, device="cuda",
                                                                         backend=backend))
           for s in solvers.SOLVERS]
    for kw in (dict(), dict(S_churn=10.0), dict(heun=False), dict(heun=False, S_churn=10.0)):
        out.append((f"sampling.edm_sampler({kw})", lambda kw=kw: sampling.edm_sampler(
            net, seeds, num_steps=5, device="cuda", backend=backend, **kw)))

    def training_pair():
        y = torch.empty(4, 3, 8, 8, device="cuda")
        sigma = torch.empty(4, device="cuda")
        F = ops.perturb(y, sigma, "fdm_edm", seed=5, offset=17, backend=backend)
        return ops.denoise_loss(F, y, sigma, "fdm_edm", seed=5, offset=17, clamp=20.0, backend=backend)

    out.append(("perturb + denoise_loss (forward)", training_pair))
    return out


SKIP = 77  # exit status: this torch build cannot run the check without a GPU (the reason printed)


def fake_conv_refused() -> str:
    """'' when a convolution on fake CUDA tensors runs here, else torch's first line of why not. torch
    2.6.0 and 2.7.1 (CUDA builds, no GPU; 2026-12-07) ask the CUDA driver which convolution backend to
    use even for fake tensors; 2.13.0 (CPU) and 2.14.1 (CUDA) do not."""
    try:
        with FAKE:
            torch.nn.functional.conv2d(torch.empty(1, 4, 8, 8, device="cuda"), torch.empty(4, 1, 3, 3, device="cuda"),
                                       groups=4)
    except RuntimeError as e:
        return str(e).strip().splitlines()[0]
    return ""


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    why = fake_conv_refused()
    if why:
        print(f"skip: this torch ({torch.__version__}) runs no convolution on fake CUDA tensors without a GPU: {why}")
        return SKIP
    checks = "--value-checks" in args  # the ops' optional argument-value checks read device values: must fail
    backend = ([a for a in args if not a.startswith("--")] or ["triton"])[0]
    mode = CudaIsFake()
    failures = 0
    prev = ops.set_value_checks(checks)  # off, as train and generate set them on an accelerator
    mp = pytest.MonkeyPatch()
    try:
        with mode:
            print(f"backend {backend} on fake CUDA tensors: available {ops.available_backends('cuda')}", flush=True)
            for label, thunk in runs(backend):
                mode.calls.clear()
                try:
                    with test_sync_free.no_sync_guard(mp):
                        result = thunk()
                    assert isinstance(result, fake_tensor.FakeTensor) and result.device.type == "cuda", result
                    prefix = "fdm_fast_ext." if backend == "cuda" else f"fdm_fast_{backend}."
                    ours = {k: v for k, v in mode.calls.items() if k.startswith(prefix)}
                    assert ours, f"no {prefix}* op ran: {mode.calls}"
                    print(f"  ok      {label:<44} {ours}", flush=True)
                except Exception:
                    failures += 1
                    print(f"  FAILED  {label}\n{traceback.format_exc()}")
            # the check itself: a host read of a fake CUDA tensor is caught
            try:
                with test_sync_free.no_sync_guard(mp):
                    torch.ones(2, device="cuda").sum().item()
                failures += 1
                print("  FAILED  a host read of a CUDA tensor went unnoticed")
            except (test_sync_free.HostRead, RuntimeError) as e:
                print(f"  ok      a host read is caught ({type(e).__name__})")
    finally:
        mp.undo()
        ops.set_value_checks(prev)
    print(f"{failures} failure(s)" if failures else "no host read of a device tensor")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
