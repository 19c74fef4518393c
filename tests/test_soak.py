"""Soak: a short training run killed with SIGKILL at random moments (during checkpoint writes too,
a checkpoint every step) and restarted with --resume auto until it finishes, for 1 process and for
2 gloo ranks under torchrun; the final weights must equal an uninterrupted run's bitwise, and no
temporary file or orphan checksum may remain. Also the graceful stop: SIGTERM to one process,
Ctrl-C to torchrun's whole process group (so each worker gets SIGINT twice), SIGTERM to rank 1
alone, and SIGTERM to both workers with a slow state write end the run with one training state, and
--resume auto finishes it bitwise equal to the uninterrupted run."""

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
import os, sys, time, torch
import fdm_fast.train
from fdm_fast.distributed import eprint, shutdown_distributed
from fdm_fast.train import exit_status, init_distributed, parse_args, resolve, training_loop
slow = float(os.environ.get("SOAK_SLOW_WRITE_S", "0"))  # for the test: a training state that takes long to write
if slow:
    real_write = fdm_fast.train.write_checkpoint
    fdm_fast.train.write_checkpoint = lambda run: (time.sleep(slow), real_write(run))[1]
o = resolve(parse_args(sys.argv[1:]))
o.network = dict(model_channels=16, num_blocks=1, attn_resolutions=(4,)); o.channel_mult = (1, 2)
rank, world, device = init_distributed()
result = training_loop(o, rank=rank, world=world, device=device, quiet=True)
if result["stopped_by"]:  # for the test: each rank says where it stopped (train prints it for rank 0 only)
    # one write per line (eprint): the ranks share the stderr file and leave together, and print() writes
    # the text and its newline separately, so two ranks' lines could interleave ("...step 12rank 1 ...")
    eprint(f"rank {rank} stopped after step {result['step']}")
shutdown_distributed()  # as train.main does
sys.exit(exit_status(result))
"""


def _cmd(tmp_path, ranks, outdir, *extra):
    script = tmp_path / "soak_run.py"
    script.write_text(SCRIPT)
    args = ["--ds", "digits", "--resolution", "8", "--batch", "16", "--precision", "fp32", "--no-compile",
            "--kimg", "0.96", "--ckpt", "0.016", "--snap", "0.128", "--keep", "2", "--grid", "4", "--grid-steps", "2",
            "--dropout", "0.1", "--outdir", str(outdir), "--resume", "auto", *extra]
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


ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """reference(ranks): (final weights, seconds) of an uninterrupted run, run once per module."""
    cache = {}

    def get(ranks):
        if ranks not in cache:
            tmp = tmp_path_factory.mktemp(f"reference{ranks}")
            t0 = time.time()
            with open(tmp / "ref.err", "wb") as err:  # a file, not a pipe nobody reads while it runs
                ref = subprocess.Popen(_cmd(tmp, ranks, tmp / "ref"), env=ENV, stdout=subprocess.DEVNULL, stderr=err,
                                       start_new_session=True)
                _wait_or_kill_group(ref, 300)
            assert ref.returncode == 0, (tmp / "ref.err").read_text()[-3000:]
            cache[ranks] = _final_weights(tmp / "ref"), time.time() - t0
        return cache[ranks]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_kill_9_and_resume_until_done_equals_an_uninterrupted_run(tmp_path, ranks, reference):
    soak_dir = tmp_path / "soak"
    want, whole = reference(ranks)
    rng = random.Random(f"soak-{ranks}-{os.environ.get('FDM_FAST_SOAK_SEED', '0')}")  # another seed: other kill points
    kills, max_kills, t_end = 0, 5, time.time() + 300

    def newest_step():
        found = snapshots.checkpoints(str(soak_dir)) if soak_dir.exists() else []
        return int(snapshots.STATE_RE.match(os.path.basename(found[-1])).group(1)) if found else 0

    while True:
        start = newest_step()
        p = subprocess.Popen(_cmd(tmp_path, ranks, soak_dir), env=ENV, stdout=subprocess.DEVNULL,
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
                p.stderr.close()
                kills += 1
                continue
        _wait_or_kill_group(p, 300)
        err = p.stderr.read().decode()
        p.stderr.close()
        assert p.returncode == 0, err[-3000:]
        break
    got = _final_weights(soak_dir)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    names = sorted(os.listdir(soak_dir))
    stray = [n for n in names if snapshots.TMP_RE.match(n) or ".tmp" in n or
             (snapshots.SIDECAR_RE.match(n) and n[:-len(".sha256")] not in names)]
    assert not stray, stray
    assert kills >= 3, f"only {kills} kills landed: the soak did not exercise resume"
    print(f"{ranks} rank(s): {kills} kills, the run took {whole:.1f} s uninterrupted")


def _default_signals():
    """In the child, before exec: SIGINT and SIGTERM as an interactive shell leaves them. pytest run as a
    background job of a script has SIGINT ignored, children inherit that, and training respects it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _stats_rows(outdir):
    path = outdir / "stats.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _worker_of_rank(torchrun_pid, rank):
    """The pid of torchrun's worker process with RANK=rank (from /proc)."""
    for child in Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split():
        with open(f"/proc/{child}/environ", "rb") as f:
            if f"RANK={rank}".encode() in f.read().split(b"\0"):
                return int(child)
    raise AssertionError(f"no worker with RANK={rank} under pid {torchrun_pid}")


@pytest.mark.slow
@pytest.mark.parametrize("ranks, sig, target", [(1, signal.SIGTERM, "process"), (2, signal.SIGINT, "group"),
                                                (2, signal.SIGTERM, "rank 1"), (2, signal.SIGTERM, "workers")])
def test_a_signal_stops_the_run_with_a_training_state_and_resume_is_exact(tmp_path, ranks, sig, target, reference):
    """"workers": both workers get the signal and torchrun does not (a scheduler that signals the
    training processes), and the training state takes 3 s to write: rank 1 must not exit before rank 0
    has written it (its line comes after rank 0's message), since torchrun SIGTERMs the other workers as
    soon as one exits with an error status and SIGKILLs them 30 s later, whatever they are doing."""
    want, _ = reference(ranks)
    run = tmp_path / "run"
    # no periodic checkpoint (--ckpt beyond the run): the one training state must come from the stop
    cmd = _cmd(tmp_path, ranks, run, "--ckpt", "100", "--snap", "100", "--tick", "0.016")
    env = ENV if target != "workers" else dict(ENV, SOAK_SLOW_WRITE_S="3")
    with open(tmp_path / "stop.err", "wb") as err:
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                             preexec_fn=_default_signals)
        t_end = time.time() + 120
        while p.poll() is None and _stats_rows(run) < 3 and time.time() < t_end:  # a row per step
            time.sleep(0.005)
        assert p.poll() is None, "the run ended before it could be signalled"
        if target == "process":
            p.send_signal(sig)  # a scheduler's SIGTERM
        elif target == "group":
            os.killpg(p.pid, sig)  # a terminal's Ctrl-C: torchrun and both workers, which torchrun signals again
        elif target == "workers":
            for r in range(ranks):
                os.kill(_worker_of_rank(p.pid, r), sig)
        else:  # one worker only, not the one that writes files: rank 0 must learn of it and stop at the same step
            os.kill(_worker_of_rank(p.pid, 1), sig)
        _wait_or_kill_group(p, 120)  # a rank left waiting in a collective would hang here
    text = (tmp_path / "stop.err").read_text()
    if ranks == 1:
        assert p.returncode == 128 + sig, text[-3000:]
    else:
        assert p.returncode != 0, text[-3000:]  # torchrun reports its workers' status (or the signal it got)
    states = snapshots.checkpoints(str(run))
    assert len(states) == 1, (states, text[-3000:])
    step = snapshots.load_state(states[0])["step"]
    assert 3 <= step < 60, step
    for r in range(ranks):  # every rank stopped after the step of the state (ranks agree on the step to stop at)
        assert f"rank {r} stopped after step {step}\n" in text, (r, step, text[-3000:])
    if target == "workers":  # the workers share the file: its order is the order of the writes
        assert text.index(f"stopped by {sig.name} after step") < text.index("rank 1 stopped after step"), text[-3000:]
    assert f"stopped by {sig.name} after step {step}" in text, text[-3000:]
    r = subprocess.run(_cmd(tmp_path, ranks, run), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                       timeout=300, start_new_session=True)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    got = _final_weights(run)
    for k in want:
        assert torch.equal(want[k], got[k]), k
