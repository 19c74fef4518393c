"""No host synchronisation and no synchronous host-to-device copy on the hot paths.

The checks run on the ``meta`` device, which stands for an accelerator whose memory the host cannot
read: a meta tensor has shapes and no data, so ``.item()``, ``bool()``, ``float()``, ``.tolist()`` or
``.cpu()`` of one raises. Host-side numbers (schedules, the sample keys and uniforms, which are
computed on the host by design and sent with asynchronous copies) stay on the CPU and may be read.
On top of that, a guard fails any ``torch.tensor(..., device=<not cpu>)`` and any copy from the host
to the device that is not ``non_blocking``. On meta every op runs on the ``torch`` backend; the other
backends' host code reads no tensor values (they only look at shapes and strides). On a GPU,
``benchmarks/gpu_check.sh`` repeats this with ``torch.cuda.set_sync_debug_mode("error")``.
"""

import contextlib

import pytest
import torch

from fdm_fast import ops, sampling, solvers, train
from fdm_fast.nn import build_denoiser

META = torch.device("meta")


class HostRead(AssertionError):
    pass


@contextlib.contextmanager
def no_sync_guard(monkeypatch):
    """Fail on host reads of device tensors and on synchronous host-to-device copies."""
    T = torch.Tensor

    def reader(name):
        orig = getattr(T, name)

        def wrapped(self, *a, **k):
            if self.device.type != "cpu":
                raise HostRead(f"Tensor.{name} on a {self.device.type} tensor (a device sync)")
            return orig(self, *a, **k)

        monkeypatch.setattr(T, name, wrapped)

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        reader(name)

    orig_to = T.to

    def to(self, *a, **k):
        device, _, non_blocking, _ = torch._C._nn._parse_to(*a, **k)
        if device is not None and self.device.type == "cpu" and device.type != "cpu" and not non_blocking:
            raise HostRead(f"a blocking host-to-{device.type} copy of a {tuple(self.shape)} tensor")
        return orig_to(self, *a, **k)

    monkeypatch.setattr(T, "to", to)
    orig_tensor = torch.tensor

    def tensor(*a, device=None, **k):
        if device is not None and torch.device(device).type != "cpu":
            raise HostRead(f"torch.tensor(..., device={device}): a host-to-device copy")
        return orig_tensor(*a, device=device, **k)

    monkeypatch.setattr(torch, "tensor", tensor)
    yield


@pytest.fixture
def checks_off():
    """Value checks off, as train and generate set them on accelerators (restored after the test)."""
    prev = ops.set_value_checks(False)
    yield
    ops.set_value_checks(prev)


def test_the_guard_catches_what_it_should(monkeypatch):
    x = torch.ones(2, device=META)
    with no_sync_guard(monkeypatch):
        for bad in (lambda: bool((x > 0).any()), lambda: float(x.sum()), lambda: x.tolist(),
                    lambda: torch.tensor([1, 2], device=META), lambda: torch.ones(2).to(META)):
            with pytest.raises((HostRead, NotImplementedError, RuntimeError)):
                bad()
        torch.ones(2).to(META, non_blocking=True)  # asynchronous: allowed


def test_ops_with_int_seeds_make_no_copy_and_no_sync(monkeypatch, checks_off):
    """Every op with an integer seed/offset, float sigmas and tensor sigmas: no copy, no sync."""
    B = 3
    y = torch.empty(B, 3, 8, 8, device=META)
    s = torch.empty(B, device=META)
    with no_sync_guard(monkeypatch):
        net_in = ops.perturb(y, s, "fdm_edm", seed=5, offset=17)
        ops.perturb(y, 0.5, "fdm_vp", seed=5, offset=17, return_x=True)
        loss = ops.denoise_loss(net_in, y, s, "fdm_edm", seed=5, offset=17, clamp=20.0)
        ops.denoise_loss(net_in, y, s, "edm", seed=5, offset=17, clamp=torch.empty(1, device=META))
        assert loss.device == META
        x_hat, net_in = ops.churn(y, s, s, "fdm_edm", seed=1, offset=2)
        x_hat, net_in = ops.churn(y, 2.0, 2.5, "fdm_edm", seed=1, offset=2)
        x1, d, net_in = ops.euler_step(x_hat, net_in, s, s, "fdm_edm", return_x=False)
        ops.heun_step(x_hat, d, net_in, s, s, "fdm_edm")
        ops.heun_step(x_hat, d, net_in, s, s, "fdm_edm", t_hat_next=s, seed=3, offset=9)
        ops.randn((B, 3, 8, 8), seed=4, offset=1, device=META)
        ops.randn((B, 3, 8, 8), seed=torch.zeros(B, dtype=torch.int64, device=META), offset=1, device=META)


def _tiny_denoiser(precond="fdm_edm"):
    cfg = dict(precond=precond, precond_options={}, arch="ddpmpp", img_resolution=8, img_channels=1, label_dim=0,
               augment_dim=0, network=dict(model_channels=16, num_blocks=1, attn_resolutions=(4,), channel_mult=(1, 2)))
    return build_denoiser(cfg).eval().requires_grad_(False).to(META)


@pytest.mark.parametrize("sampler, kw", [
    ("edm_sampler", dict()),                               # deterministic Heun, generate's default
    ("edm_sampler", dict(S_churn=10.0)),                   # stochastic Heun
    ("edm_sampler", dict(heun=False)),                     # Euler
    ("edm_sampler", dict(heun=False, S_churn=10.0)),       # Euler with churn
    ("dpm_solver_pp_2m", dict()),
])
def test_every_sampler_runs_without_a_sync(monkeypatch, checks_off, sampler, kw):
    net = _tiny_denoiser()
    seeds = torch.zeros(4, dtype=torch.int64, device=META)  # seeds live on the device (as GraphedSampler's)
    with no_sync_guard(monkeypatch):
        out = getattr(sampling, sampler)(net, seeds, num_steps=5, device=META, **kw)
    assert out.shape == (4, 1, 8, 8) and out.device == META


@pytest.mark.parametrize("afs", [False, True])
@pytest.mark.parametrize("solver", solvers.SOLVERS)
def test_every_solver_runs_without_a_sync(monkeypatch, checks_off, solver, afs):
    # the coefficients are host floats; each step is one ops.multistep call whose coefficient
    # columns are filled on the device: nothing is read back or copied synchronously (the analytic
    # first step's stand-in output too: a host number times x)
    net = _tiny_denoiser()
    seeds = torch.zeros(4, dtype=torch.int64, device=META)
    with no_sync_guard(monkeypatch):
        out = solvers.sample(net, seeds, solver=solver, steps=5, device=META, afs=afs)
    assert out.shape == (4, 1, 8, 8) and out.device == META


TINY = ["--ds", "digits", "--resolution", "8", "--batch", "16", "--precision", "fp32", "--no-compile"]


@pytest.mark.parametrize("extra", [[], ["--xflip", "--cond", "--data-on-device", "on"],
                                   ["--augment", "0.5", "--precond", "fdm_vp"],
                                   ["--batch-gpu", "8"]])  # bf16: autocast has no meta device
def test_training_step_runs_without_a_sync(tmp_path, monkeypatch, extra):
    o = train.resolve(train.parse_args([*TINY, "--outdir", str(tmp_path), *extra]))
    o.network = dict(model_channels=16, num_blocks=1, attn_resolutions=(4,))
    o.channel_mult = (1, 2)
    prev = ops.set_value_checks(True)
    try:
        run = train.setup(o, device=META)
        assert not ops._validate._value_checks, "train must turn value checks off on an accelerator"
        train.train_step(run)  # the first step may fill caches (the wavelet filter of the augmentation)
        with no_sync_guard(monkeypatch):
            for _ in range(2):
                loss = train.train_step(run)
        assert loss.device == META and run.step == 3
    finally:
        ops.set_value_checks(prev)


def _fake_cuda_host(*args):
    """tests/fake_cuda_host.py in a process of its own (real Triton kernels: no interpreter there)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(here.parent), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, str(here / "fake_cuda_host.py"), *args], capture_output=True, text=True,
                       env=env, timeout=600, cwd=here.parent)
    if r.returncode == 77:  # fake_cuda_host.SKIP: the line says which torch and why
        pytest.skip(r.stdout.strip())
    return r


def _has_cuda_kernels():
    try:
        from fdm_fast import _C
        return bool(_C.has_cuda())
    except Exception:
        return False


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_the_fused_backends_host_code_reads_no_device_value(backend):
    """On meta every op takes the torch backend; here the triton and cuda backends' own host code runs,
    on fake CUDA tensors (tests/fake_cuda_host.py): every solver, the EDM samplers and perturb + loss."""
    pytest.importorskip("triton")
    if backend == "cuda" and not _has_cuda_kernels():
        pytest.skip("fdm_fast._C has no CUDA kernels in this build (a CPU-only torch)")
    r = _fake_cuda_host(backend)
    assert r.returncode == 0, (r.stdout + r.stderr)[-6000:]
    rows = [line for line in r.stdout.splitlines() if line.startswith("  ok ")]
    assert len(rows) == len(solvers.SOLVERS) + 4 + 1 + 1, r.stdout  # + the self-check of the guard
    assert "no host read of a device tensor" in r.stdout


def test_the_fake_cuda_check_fails_when_the_host_reads_device_values():
    # the ops' optional value checks read device tensors (off on accelerators): with them on, every run fails
    pytest.importorskip("triton")
    r = _fake_cuda_host("triton", "--value-checks")
    assert r.returncode == 1, (r.stdout + r.stderr)[-4000:]
    assert r.stdout.count("  FAILED  ") == len(solvers.SOLVERS) + 4 + 1, r.stdout[-4000:]
    assert "Tensor.__bool__ on a cuda tensor" in r.stdout
