"""Soak: a short training run killed with SIGKILL at random moments (during checkpoint writes too,
a checkpoint every step) and restarted with --resume auto until it finishes, for 1 process and for
2 gloo ranks under torchrun; the final weights must equal an uninterrupted run's bitwise, and no
temporary file or orphan checksum may remain."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fdm_fast import snapshots

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = """
import sys, torch
from fdm_fast.distributed import shutdown_distributed
from fdm_fast.train import init_distributed, parse_args, resolve, training_loop
o = resolve(parse_args(sys.argv[1:]))
o.network = dict(model_channels=16, num_blocks=1, attn_resolutions=(4,)); o.channel_mult = (1, 2)
rank, world, device = init_distributed()
training_loop(o, rank=rank, world=world, device=device, quiet=True)
shutdown_distributed()  # as train.main does
"""


def _cmd(tmp_path, ranks, outdir):
    script = tmp_path / "soak_run.py"
    script.write_text(SCRIPT)
    args = ["--ds", "digits", "--resolution", "8", "--batch", "16", "--precision", "fp32", "--no-compile",
            "--kimg", "0.96", "--ckpt", "0.016", "--snap", "0.128", "--keep", "2", "--grid", "4", "--grid-steps", "2",
            "--dropout", "0.1", "--outdir", str(outdir), "--resume", "auto"]
    if ranks == 1:
        return [sys.executable, str(script), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", str(script),
            *args]


def _final_weights(outdir):
    newest = snapshots.checkpoints(str(outdir))[-1]
    state = snapshots.load_state(newest)
    assert state["step"] == 60, (newest, state["step"])  # 960 images / 16
    return state["net"]


def _wait_or_kill_group(p, timeout):
    """Wait for a run; on timeout kill its whole process group, torchrun's workers included (killing
    torchrun alone left them running, orphaned, after a hang)."""
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        raise


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_kill_9_and_resume_until_done_equals_an_uninterrupted_run(tmp_path, ranks):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    ref_dir, soak_dir = tmp_path / "ref", tmp_path / "soak"
    t0 = time.time()
    with open(tmp_path / "ref.err", "wb") as err:  # a file, not a pipe nobody reads while it runs
        ref = subprocess.Popen(_cmd(tmp_path, ranks, ref_dir), env=env, stdout=subprocess.DEVNULL, stderr=err,
                               start_new_session=True)
        _wait_or_kill_group(ref, 300)
    assert ref.returncode == 0, (tmp_path / "ref.err").read_text()[-3000:]
    whole = time.time() - t0
    rng = random.Random(f"soak-{ranks}-{os.environ.get('FDM_FAST_SOAK_SEED', '0')}")  # another seed: other kill points
    kills, max_kills, t_end = 0, 5, time.time() + 300

    def newest_step():
        found = snapshots.checkpoints(str(soak_dir)) if soak_dir.exists() else []
        return int(snapshots.STATE_RE.match(os.path.basename(found[-1])).group(1)) if found else 0

    while True:
        start = newest_step()
        p = subprocess.Popen(_cmd(tmp_path, ranks, soak_dir), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, start_new_session=True)
        if kills < max_kills:
            # let it write a few checkpoints, then kill within the next 50 ms: often mid-write
            target = start + rng.randint(2, 8)
            while p.poll() is None and newest_step() < target and time.time() < t_end:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.05))
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                kills += 1
                continue
        _wait_or_kill_group(p, 300)
        err = p.stderr.read().decode()
        assert p.returncode == 0, err[-3000:]
        break
    want, got = _final_weights(ref_dir), _final_weights(soak_dir)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    names = sorted(os.listdir(soak_dir))
    stray = [n for n in names if snapshots.TMP_RE.match(n) or ".tmp" in n or
             (snapshots.SIDECAR_RE.match(n) and n[:-len(".sha256")] not in names)]
    assert not stray, stray
    assert kills >= 3, f"only {kills} kills landed: the soak did not exercise resume"
    print(f"{ranks} rank(s): {kills} kills, the run took {whole:.1f} s uninterrupted")
