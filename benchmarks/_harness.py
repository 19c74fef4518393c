"""Shared benchmark plumbing: device name, timing (medians, warm-up reported apart), copy bandwidth,
and appending rows to benchmarks/RESULTS.md with machine and date."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.readlines()
        for line in lines:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    isa = ""
    try:  # which build of fdm_fast's CPU kernels runs (FDM_FAST_CPU_ISA caps it)
        from fdm_fast.ops import extension

        isa = f", fdm_fast CPU kernels: {extension.cpu_isa()}"
    except ImportError:
        pass
    return f"CPU {model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads (torch {torch.__version__}{isa})"


def steady_heap() -> str:
    """Keep freed large blocks in glibc's heap, so fresh tensors stop paying page faults.

    By default glibc serves blocks above a moving threshold (128 KiB, rising to the largest block freed)
    with mmap and returns freed heap tops to the kernel, so whether a 6 MB output costs ~1,500 page
    faults depends on what was freed before it. On the 2-core VM of 2026-11-30 that swung one eager
    Euler step between 0.9 and 10 ms and the fused one between 0.4 and 3.8 ms, in whichever order the
    rows ran. Raising both thresholds to 1 GiB keeps freed blocks resident for reuse: close to the state
    a long run reaches with a caching allocator (jemalloc, tcmalloc), and the harder baseline, since the
    eager composite allocates the most. Not a guarantee (glibc still grows the heap when a freed block
    is a few bytes short of an aligned request), so ops_bandwidth reports the faults it saw: 13-18 per
    call for the Euler rows at 64x3x64x64 against 427-966 with glibc's defaults, four runs here.
    Returns a line for the table's notes.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "allocator: left as is (no glibc mallopt here)"
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    ok = mallopt(M_MMAP_THRESHOLD, 1 << 30) == 1 and mallopt(M_TRIM_THRESHOLD, 1 << 30) == 1
    return ("allocator: glibc mmap and trim thresholds at 1 GiB (freed blocks stay resident for reuse; "
            "--malloc default leaves glibc as it is)" if ok else "allocator: mallopt refused; glibc left as is")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict, device: torch.device, *, reps: int, warmup: int = 2, log=None, deadline=None,
                     info: dict | None = None):
    """{name: (median seconds, first-call seconds)} with the calls of all ``fns`` interleaved round-robin,
    so that a slow phase of a shared machine (another tenant, frequency changes) hits every
    implementation alike instead of whichever ran then. First calls (compilation) are timed apart.
    ``log`` (e.g. print) hears of each first call and phase as it ends: a run cut short still says how far it got.

    ``deadline`` (a time.perf_counter() value) bounds the run for a caller with a hard time limit: a fn
    whose first call would start after it is left out of the result (the caller reports it as
    skipped), and warm-up and timing rounds stop when the next round would end after it, so the
    result has fewer repetitions (at least one round) instead of being lost; ``info['rounds']`` (when
    given a dict) says how many rounds were timed."""
    first, t_start = {}, time.perf_counter()
    for k, fn in fns.items():
        if deadline is not None and time.perf_counter() >= deadline:
            if log:
                log(f"  {k}: skipped (time budget spent before its first call)")
            continue
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        first[k] = time.perf_counter() - t0
        if log:
            log(f"  first call of {k}: {first[k]:.2f} s")
    fns = {k: fns[k] for k in first}
    times = {k: [] for k in fns}

    def room(round_s: float) -> bool:
        return deadline is None or time.perf_counter() + round_s < deadline

    round_s = 0.0
    for _ in range(warmup):
        if not room(round_s):
            break
        t0 = time.perf_counter()
        for fn in fns.values():
            fn()
        sync(device)
        round_s = time.perf_counter() - t0
    sync(device)
    if log:
        log(f"  warm-up done at {time.perf_counter() - t_start:.1f} s; timing {reps} interleaved rounds")
    for r in range(reps):
        if r and not room(round_s):
            if log:
                log(f"  time budget: stopped after {r} of {reps} rounds")
            break
        t_round = time.perf_counter()
        for k, fn in fns.items():
            if device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times[k].append(a.elapsed_time(b) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
        round_s = time.perf_counter() - t_round
        if info is not None:
            info["rounds"] = r + 1
    return {k: (statistics.median(v), first[k]) for k, v in times.items()}


def deadline_after(seconds) -> float | None:
    """The ``deadline`` for time_interleaved of a ``--time-budget`` option (None: no budget)."""
    return None if seconds is None else time.perf_counter() + seconds


def time_graphed(fns: dict, device: torch.device, *, calls: int, reps: int = 20, log=print) -> dict:
    """{name: device seconds per call, or None} for CUDA: ``calls`` calls of each fn captured in one
    CUDA graph and the graphs replayed round-robin, so no host work (Python, argument checks,
    launches) is in the time. This is the number to hold against the copy bandwidth: timed one call at
    a time (time_interleaved), an op of a few MB measures the host's launch latency, not the memory.
    A fn that cannot be captured gets None and a logged reason."""
    graphs = {}
    for k, fn in fns.items():
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # capture wants its warm-up on a side stream
                for _ in range(calls):
                    fn()
            torch.cuda.current_stream(device).wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(calls):
                    fn()
            g.replay()
            graphs[k] = g
        except Exception as e:  # noqa: BLE001 - a benchmark row, not a test: report and go on
            log(f"  {k}: not captured in a CUDA graph ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    torch.cuda.synchronize(device)
    times = {k: [] for k in graphs}
    for _ in range(reps):
        for k, g in graphs.items():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            b.synchronize()
            times[k].append(a.elapsed_time(b) / 1e3 / calls)
    del graphs
    return {k: statistics.median(times[k]) if k in times else None for k in fns}


def cache_bytes(device: torch.device) -> int:
    """Last-level cache to defeat by rotating buffers: the GPU's L2, or a generous CPU L3 guess."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    try:
        import subprocess

        out = subprocess.run(["getconf", "LEVEL3_CACHE_SIZE"], capture_output=True, text=True).stdout.strip()
        if out and int(out) > 0:
            return int(out)
    except Exception:
        pass
    return 32 << 20


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, reps: int = 10) -> float:
    """Measured device copy bandwidth in bytes/s (read + write counted) on a buffer far above cache."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t, _ = time_interleaved({"copy": lambda: dst.copy_(src)}, device, reps=reps)["copy"]
    return 2 * nbytes / t


def append_results(title: str, header: list[str], rows: list[list[str]], notes: list[str], path=None) -> None:
    date = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [f"\n## {title} ({date})\n", *[f"{n}  " for n in notes], "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    path = Path(path) if path else RESULTS
    if not path.exists():
        path.write_text("# Measured results\n\nEvery number here was measured by a script in this folder; "
                           "each section names its machine (the card for GPU numbers), date and command.\n")
    with path.open("a") as f:
        f.write("\n".join(lines) + "\n")


def add_results_arg(ap) -> None:
    """``--results [FILE]``: append the rows to FILE (bare: benchmarks/RESULTS.md). Without it a
    benchmark writes nothing into the checkout: tracked files change only when asked to."""
    ap.add_argument("--results", nargs="?", type=Path, const=RESULTS, default=None, metavar="FILE",
                    help="append the rows to FILE (no FILE: benchmarks/RESULTS.md); default: print only")


def check_outputs(ap, args) -> None:
    """Refuse, as an argparse error (status 2), an output a benchmark could not write at its end:
    ``--results FILE``, ``--json FILE`` and ``--out DIR`` (folders made now when missing, a file made and
    removed in each). Checked before the minutes of measuring, which a bad path would otherwise lose."""
    from fdm_fast.snapshots import cannot_write, cannot_write_in

    for flag in ("results", "json"):
        path = getattr(args, flag, None)
        if path is None:
            continue
        why = cannot_write(str(path))
        if why is None and flag == "results" and os.path.isfile(path):  # appended to in place
            try:
                open(path, "a").close()
            except OSError as e:
                why = f"cannot append to it ({e.strerror})"
        if why is not None:
            ap.error(f"--{flag} {path}: {why}")
    out = getattr(args, "out", None)
    if out is not None:
        why = cannot_write_in(str(out))
        if why is not None:
            ap.error(f"--out {out}: {why}")


def write_json(path, obj) -> None:
    """``obj`` as indented JSON at ``path``, renamed into place: an interrupted write leaves the old file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=1))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def print_table(header: list, rows: list) -> None:
    """Rows under their column names, aligned."""
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    for k, r in enumerate([header, ["-" * w for w in widths], *rows]):
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)), flush=True)
