"""Run files: training states and network snapshots, written atomically with a SHA-256 beside each,
verified on load. Shared by train, generate, fid and the benchmarks (so none of them imports train).

Each ``X.pt`` gets ``X.pt.sha256`` in ``sha256sum`` format (``sha256sum -c X.pt.sha256`` checks it by
hand). Writing: payload to ``X.pt.tmp<pid>``, then its checksum to ``X.pt.sha256.tmp<pid>``, then both
renamed (checksum first). A crash leaves either the old pair, a checksum whose file is missing or
differs (the file fails verification and ``--resume auto`` takes the previous one), or temp files
that the next start of the run removes. Files load with ``torch.load(weights_only=True)``: no
pickled code runs.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import socket
import tempfile
import time
import warnings
from typing import Optional

import torch

STATE_RE = re.compile(r"^training-state-(\d{8})\.pt$")
TMP_RE = re.compile(r"^(training-state-\d+\.pt|network-snapshot-[\d-]+\.pt)(\.sha256)?\.tmp\d+$|"
                    r"^samples-[\d-]+\.png\.tmp\.png$|^stats\.jsonl\.tmp\d+$|"
                    r"^(training|metrics)\.png(\.panel\d+)?(\.tmp\d+\.png)+$")
SIDECAR_RE = re.compile(r"^(training-state-\d+\.pt|network-snapshot-[\d-]+\.pt)\.sha256$")


class SnapshotError(Exception):
    """A run file that cannot be used: missing, truncated, corrupt, or not the kind of file expected."""


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_checksum(path: str, data_path: Optional[str] = None) -> None:
    """``path.sha256`` (sha256sum format, naming ``path``) of the bytes at ``data_path`` (default ``path``),
    written to a temp file, synced and renamed into place."""
    digest = sha256_of(data_path or path)
    side = f"{path}.sha256"
    with open(f"{side}.tmp{os.getpid()}", "w") as f:
        f.write(f"{digest}  {os.path.basename(path)}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(f"{side}.tmp{os.getpid()}", side)


class WriteError(SnapshotError):
    """A run file that could not be written (a full disk, a quota): nothing under its name changed."""


def atomic_save(obj, path: str) -> None:
    """``torch.save(obj, path)`` with its checksum beside it, both renamed into place (module docstring).
    WriteError when the bytes cannot be written (torch.save says so with an OSError or a RuntimeError):
    the partial temporary files are removed, so a full disk is not left fuller, and ``path`` is as it was."""
    tmp, side_tmp = f"{path}.tmp{os.getpid()}", f"{path}.sha256.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        write_checksum(path, tmp)
    except (OSError, RuntimeError) as e:
        for p in (tmp, side_tmp):
            if os.path.exists(p):
                os.remove(p)
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:200]
        raise WriteError(f"{path}: could not be written ({why})") from e
    os.replace(tmp, path)


class RunLocked(SnapshotError):
    """A run folder another live process is training in."""


LOCK_NAME = ".lock"


@contextlib.contextmanager
def run_lock(folder: str):
    """Hold an advisory lock on a run folder (``flock`` on ``folder/.lock``, which names the holder) while
    the block runs: a second run started in the same folder gets RunLocked before it touches anything,
    instead of two runs interleaving their checkpoints. The kernel drops the lock when its process ends,
    however it ends (SIGKILL, a lost node), so no stale lock can block a resume. Where the file system
    has no flock (some network mounts) the run goes on unguarded, with a warning."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        fcntl = None
    fd = None
    if fcntl is not None:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "a process"
            os.close(fd)
            raise RunLocked(f"{folder}: another run is training in this folder ({holder}); wait for it or stop it, "
                            "or give another --outdir") from None
        except OSError as e:
            os.close(fd)
            fd = None
            warnings.warn(f"{folder}: cannot lock the run folder ({e.strerror}); a second run started in it "
                          "would not be refused")
    if fd is not None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    try:
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, LOCK_NAME))
            os.close(fd)  # releases the lock


def _folder_refuses(folder: str) -> Optional[tuple]:
    """("create" or "write", the OS's reason) when ``folder`` cannot be made or a file made in it, else None.
    A file is made and removed: ``os.access`` says yes to root in folders that still refuse new files
    (/proc, /sys, an NFS export that squashes root)."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        return "create", e.strerror
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return "write", e.strerror
    return None


def cannot_write_in(folder: str) -> Optional[str]:
    """Why a tool could not write files in ``folder`` (created when missing), or None. For checking an
    output before the work whose result it will hold."""
    refused = _folder_refuses(folder)
    if refused is None:
        return None
    what, why = refused
    return f"cannot create it ({why})" if what == "create" else f"cannot write files there ({why})"


def cannot_write(path: str) -> Optional[str]:
    """Why a tool could not write the file ``path`` (its folder is created when missing), or None."""
    if os.path.isdir(path):
        return "is a folder; expected the file to write"
    parent = os.path.dirname(os.path.abspath(path))
    refused = _folder_refuses(parent)
    if refused is None:
        return None
    what, why = refused
    if what == "create":
        return f"cannot create its folder ({why})"
    return f"cannot write files in its folder {parent} ({why})"


def missing_folders(folder: str) -> list:
    """``folder`` and those of its parents that do not exist yet, deepest first: what checking an output
    (cannot_write_in, cannot_write) will create, for remove_empty_folders if the command then fails."""
    out, folder = [], os.path.abspath(folder)
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        out.append(folder)
        folder = os.path.dirname(folder)
    return out


def remove_empty_folders(folders) -> None:
    """Remove each of ``folders`` (deepest first, as missing_folders lists them) that is empty, so that a
    command refused after making its output folders leaves none behind."""
    for folder in folders:
        try:
            if not os.listdir(folder):
                os.rmdir(folder)
        except OSError:  # another rank removed it first, or wrote into it
            pass


def remove(path: str) -> None:
    for p in (path, f"{path}.sha256"):
        if os.path.exists(p):
            os.remove(p)


def verify(path: str) -> None:
    """Raise SnapshotError unless ``path`` exists, is non-empty and matches its checksum (if it has one;
    a file without one, e.g. from before checksums, only warns)."""
    if not os.path.isfile(path):
        raise SnapshotError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise SnapshotError(f"{path}: empty file")
    side = f"{path}.sha256"
    if not os.path.isfile(side):
        warnings.warn(f"{path}: no checksum file ({os.path.basename(side)}) beside it; loading unverified",
                      stacklevel=3)
        return
    with open(side) as f:
        want = f.read().split()[:1]
    got = sha256_of(path)
    if not want or want[0] != got:
        raise SnapshotError(f"{path}: the file does not match its checksum {os.path.basename(side)} "
                            f"(SHA-256 {got[:16]}..., expected {(want or ['?'])[0][:16]}...): it is corrupt or "
                            "was overwritten; use an earlier file")


def load(path: str, *, kind: str = "file") -> dict:
    """The dict saved at ``path``, verified, loaded with weights_only=True; clear errors otherwise."""
    verify(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, pickled code refused
        raise SnapshotError(f"{path}: not a readable {kind}: {_why_unreadable(path, e)}") from None
    if not isinstance(data, dict):
        raise SnapshotError(f"{path}: expected a {kind} (a dict), got a {type(data).__name__}")
    return data


def _why_unreadable(path: str, e: Exception) -> str:
    """What torch.load's failure means for the user, in one line. torch's own text for a refused pickle
    advises retrying with weights_only=False, i.e. running the file's code: not repeated here."""
    text = str(e)
    with open(path, "rb") as f:
        head = f.read(8)
    if "Weights only load failed" in text:
        detail = text.split("WeightsUnpickler error:", 1)[-1].strip().split("\n")[0].split(". Please")[0].strip()
        hint = "; an official EDM/FDM snapshot loads under its .pkl name" if head.startswith(b"\x80") else ""
        return (f"loading it with weights_only=True failed ({detail[:200]}): it is not plain tensors and containers, "
                f"and fdm_fast runs no code from a file{hint}")
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip format
        return f"a damaged or truncated zip archive ({text.split('. This is an internal')[0][:200]})"
    if not head.startswith(b"\x80"):  # neither a zip nor a pickle (torch.save's legacy format)
        return f"not a file torch.save wrote (it begins {head!r})"
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}"


def what_is(data: dict) -> str:
    if {"net", "opt", "ema", "step", "config"} <= set(data):
        return "a training state"
    if {"ema", "config"} <= set(data):
        return "a network snapshot"
    return f"not an fdm_fast run file (keys: {', '.join(sorted(map(str, data))[:8])})"


def load_state(path: str) -> dict:
    """A training state (training-state-*.pt), or SnapshotError naming what the file is instead."""
    data = load(path, kind="training state")
    if what_is(data) != "a training state":
        raise SnapshotError(f"{path}: this is {what_is(data)}, not a training state (training-state-*.pt)")
    return data


def normalise_config(config: dict) -> dict:
    """A config as JSON sees it: tuples and lists alike, so (8,) == [8]."""
    return json.loads(json.dumps(config))


def checkpoints(outdir: str) -> list:
    """The run's training states (exactly ``training-state-NNNNNNNN.pt``), oldest first."""
    found = [p for p in glob.glob(os.path.join(outdir, "training-state-*.pt")) if STATE_RE.match(os.path.basename(p))]
    return sorted(found, key=lambda p: int(STATE_RE.match(os.path.basename(p)).group(1)))


def newest_valid_checkpoint(outdir: str, log=print) -> Optional[tuple]:
    """(path, state) of the newest training state that verifies and loads; names each one skipped."""
    for path in reversed(checkpoints(outdir)):
        try:
            return path, load_state(path)
        except SnapshotError as e:
            log(f"--resume auto: skipping {os.path.basename(path)}: {e}")
    return None


def remove_stale_temp_files(outdir: str) -> list:
    """Delete what a killed writer left in ``outdir``: temp files, and checksums whose file never
    arrived (or was pruned); ours only, by exact name pattern."""
    gone = []
    if os.path.isdir(outdir):
        names = set(os.listdir(outdir))
        for name in sorted(names):
            m = SIDECAR_RE.match(name)
            if TMP_RE.match(name) or (m and m.group(1) not in names):  # a temp file, or a checksum without its file
                os.remove(os.path.join(outdir, name))
                gone.append(name)
    return gone


def snapshot_name(cur_nimg: int, outdir: str = "", prefix: str = "network-snapshot",
                  ext: str = "pt") -> str:
    """``network-snapshot-000060.pt`` (whole kimg, EDM's naming); when that name is already taken in
    ``outdir`` (snapshots less than 1 kimg apart), ``...-000000-512.pt``: never two files for one name."""
    name = f"{prefix}-{cur_nimg // 1000:06d}.{ext}"
    if outdir and os.path.exists(os.path.join(outdir, name)):
        name = f"{prefix}-{cur_nimg // 1000:06d}-{cur_nimg % 1000:03d}.{ext}"
    return name


SNAPSHOT_RE = re.compile(r"network-snapshot(?:-(\d{6})(?:-(\d{3}))?)?\.pt")


def network_file(path: str) -> str:
    """``path``, or where it is a folder, its snapshot: a training run's newest ``network-snapshot-*.pt`` by
    the images in its name (``-000060.pt`` < ``-000060-512.pt`` < ``-000061.pt``), or the
    ``network-snapshot.pt`` of a ``fdm_fast.convert`` folder. SnapshotError for a folder without one; any
    other path is returned as it is (the loaders name what is wrong with it)."""
    path = str(path)
    if not os.path.isdir(path):
        return path
    found = [((int(m.group(1) or -1), int(m.group(2) or -1)), n) for n in os.listdir(path)
             if (m := SNAPSHOT_RE.fullmatch(n))]
    if not found:
        raise SnapshotError(f"{path}: a folder without a network-snapshot-*.pt (give a snapshot file)")
    return os.path.join(path, max(found)[1])


def load_snapshot(path: str, device="cpu"):
    """The EMA network of a snapshot, built from its config. Reads fdm_fast snapshots (``.pt``: verified,
    weights_only=True), official EDM/FDM snapshots (``.pkl``: fdm_fast.official, no code from the file
    runs) and ``.safetensors`` weights with their config (``config.json`` beside them, or the file's
    metadata), as ``python -m fdm_fast.convert`` writes them. A folder stands for its newest snapshot
    (``network_file``)."""
    from .nn import build_denoiser

    path = network_file(path)
    if path.endswith(".pkl"):
        from .official import OfficialFormatError, load_official_denoiser

        if not os.path.isfile(path):
            raise SnapshotError(f"{path}: no such file")
        try:
            return load_official_denoiser(path, device)
        except OfficialFormatError as e:
            raise SnapshotError(str(e)) from None
    if path.endswith(".safetensors"):
        from .official import OfficialFormatError, load_safetensors

        verify(path)
        try:
            tensors, meta = load_safetensors(path)
        except OfficialFormatError as e:
            raise SnapshotError(str(e)) from None
        side = os.path.join(os.path.dirname(path), "config.json")
        if "fdm_fast_config" in meta:
            config = json.loads(meta["fdm_fast_config"])
        elif os.path.isfile(side):
            with open(side) as f:
                config = json.load(f)
        else:
            raise SnapshotError(f"{path}: no config (neither fdm_fast_config metadata nor config.json beside it)")
        data = dict(ema=tensors, config=config)
    else:
        data = load(path, kind="network snapshot")
    if "ema" not in data or "config" not in data:
        raise SnapshotError(f"{path}: this is {what_is(data)}, not a network snapshot (network-snapshot-*.pt, "
                            "or a training state)")
    try:
        denoiser = build_denoiser(data["config"])
        denoiser.load_state_dict(data["ema"])
    except Exception as e:
        raise SnapshotError(f"{path}: its weights do not fit the network its config describes "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    return denoiser.eval().requires_grad_(False).to(device)
