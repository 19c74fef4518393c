"""Process-group set-up for torchrun (it sets RANK / WORLD_SIZE / LOCAL_RANK): NCCL on GPUs, gloo on CPUs."""

from __future__ import annotations

import os
import sys
import time

import torch


def eprint(msg: str) -> None:
    """``msg`` and its newline on stderr in one write. print() writes the text and the newline apart, so
    the lines of ranks that fail or stop together under torchrun could run into each other."""
    sys.stderr.write(f"{msg}\n")
    sys.stderr.flush()


def init_distributed():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def shutdown_distributed(settle_s: float = 0.1) -> None:
    """Destroy the process groups, if there are any.

    First sleep ``settle_s`` (which releases the GIL), for the gloo groups. In torch 2.6 the Gloo process group's
    destructor keeps the GIL while it joins its worker threads, and a worker that still has to drop the
    last reference to a finished collective's tensor needs the GIL to do it: the process hung at exit,
    after training had finished (fixed upstream by pytorch/pytorch#154976, mid-2025). Under torch 2.6
    on a 2-core CPU, 2 of 4 two-rank runs hung there; with the sleep, 0 of 12.
    """
    if not torch.distributed.is_initialized():
        return
    if settle_s > 0:  # whatever the default backend: train's stop flag has a gloo group beside NCCL's
        time.sleep(settle_s)
    torch.distributed.destroy_process_group()
