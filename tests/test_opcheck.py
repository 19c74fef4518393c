"""torch.library.opcheck for every registered op: schema, fake kernels, and AOT dispatch with static
and dynamic shapes, on each backend this machine has (the compiled ops on CPU here and CUDA on a GPU,
the Triton ops in the interpreter here and on the GPU there). The raw ops get inputs that do not
require grad: their autograd lives one level up (ops.denoise_loss; tests/test_autograd_compile.py)."""

import pytest
import torch

from conftest import DEVICE, HAS_CPU_EXT, HAS_TRITON
from fdm_fast import schedules

P = schedules.get_precond("fdm_edm")
KIND, FDM, PARAMS = P.kernel_spec()
PARAMS = list(PARAMS)


def _inputs(device, cl=False):
    g = torch.Generator().manual_seed(0)
    t = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    x = t(2, 3, 8, 8)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    like = lambda v: v.contiguous(memory_format=torch.channels_last) if cl else v  # noqa: E731
    return dict(x=x, F=like(t(2, 3, 8, 8)), y=like(t(2, 3, 8, 8)), d=like(t(2, 3, 8, 8)),
                s=torch.rand(2, generator=g).to(device) + 0.5, rng=torch.tensor([[5, 7], [9, 11]], device=device),
                clamp=torch.tensor([20.0], device=device))


def _cases(ns, device, cl):
    i = _inputs(device, cl)
    spec = (KIND, FDM, PARAMS)
    ops = getattr(torch.ops, ns)
    cases = [
        (ops.perturb, (i["y"], i["s"], i["rng"], None, *spec, torch.float32, True)),
        (ops.randn, ([2, 3, 8, 8], i["rng"])),
        (ops.churn, (i["x"], i["s"], i["s"] * 1.5, i["rng"], None, 1.0, *spec, torch.bfloat16)),
        (ops.heun_step, (i["x"], i["d"], i["y"], i["s"] * 2, i["s"], i["s"] * 1.2, i["rng"], None, 1.0, *spec,
                         torch.float32)),
        (ops.heun_step, (i["x"], i["d"], i["y"], i["s"] * 2, i["s"], None, i["rng"], None, 1.0, *spec,
                         torch.float32)),
        (ops.loss_fwd, (i["F"], i["y"], i["s"], i["rng"], None, i["clamp"], *spec, True)),
        (ops.loss_fwd, (i["F"], i["y"], i["s"], i["rng"], None, i["clamp"], *spec, False)),
        (ops.loss_bwd, (i["s"], i["F"], i["y"], i["s"], i["rng"], None, i["clamp"], *spec)),
        (ops.scale_grad, (i["y"], i["s"])),
    ]
    if ns == "fdm_fast_ext":
        cases += [
            (ops.euler_step, (i["x"], i["y"], i["s"] * 2, i["s"], *spec, torch.float32, True, False)),
            (ops.euler_step, (i["x"], i["y"], i["s"] * 2, i["s"], *spec, torch.float32, False, False)),
        ]
    else:
        cases += [
            (ops.euler_step, (i["x"], i["y"], i["s"] * 2, i["s"], *spec, torch.float32, False, True)),
            (ops.churn, (i["x"], i["s"], None, i["rng"], None, 1.0, *spec, torch.float32)),
        ]
    cases += [  # the solvers' step: 2 stored tensors, guidance, noise, all outputs; and the bare form
        (ops.multistep, (i["x"], i["F"], i["y"], [i["d"], i["x"]], torch.rand(2, 9 + 2).to(device), i["rng"],
                         None, True, torch.bfloat16, True, True)),
        (ops.multistep, (i["x"], None, None, [], torch.rand(1, 9).to(device), i["rng"][:1], None, False,
                         torch.float32, False, False)),
    ]
    return cases


def _namespaces():
    out = []
    if HAS_CPU_EXT:
        out.append(pytest.param("fdm_fast_ext", id=f"compiled-{DEVICE.type}"))
    if HAS_TRITON:
        out.append(pytest.param("fdm_fast_triton", id=f"triton-{DEVICE.type}"))
    return out


@pytest.mark.parametrize("cl", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("ns", _namespaces())
def test_opcheck_every_registered_op(ns, cl):
    from fdm_fast import ops

    ops.available_backends()  # loads the Triton modules and the extension: registers their ops
    if ns == "fdm_fast_triton":
        if DEVICE.type != "cuda":
            pytest.skip("the Triton interpreter launches kernels even on fake tensors, so opcheck's fake-tensor "
                        "test cannot run here; it runs on a GPU (benchmarks/gpu_check.sh)")
        ops._backends.triton_module("perturb")
    for op, args in _cases(ns, DEVICE, cl):
        torch.library.opcheck(op, args)
