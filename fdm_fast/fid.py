"""FID: ``python -m fdm_fast.fid ref|calc``, Inception-v3 features through torch-fidelity.

    python -m fdm_fast.fid ref  --data datasets/cifar10-32x32.zip --dest fid-refs/cifar10-32x32.npz
    python -m fdm_fast.fid calc --images out/ --ref fid-refs/cifar10-32x32.npz
    python -m fdm_fast.fid calc --network runs/.../network-snapshot-010000.pt --num 50000 --steps 18 --ref ...

``calc --network`` samples seeds 0..num-1 with EDM's Heun sampler on one device, writing no images.
For another solver, guidance, several GPUs (torchrun) or a run that can be cut and finished later,
write the images with ``python -m fdm_fast.generate --outdir OUT [--skip-existing]`` and use
``calc --images OUT``.

Features are the 2048-d pool features of torch-fidelity's ``inception-v3-compat`` extractor, which
matches the TensorFlow Inception used by the FID literature. Its weights cannot be downloaded by this
tool: pass ``--inception PATH`` to ``weights-inception-2015-12-05-6726825d.pth`` (or set
``FDM_FAST_INCEPTION``, or put the file in torch hub's checkpoint cache). Reference statistics are
saved as EDM's reference ``.npz`` files are: ``mu`` [2048] and ``sigma`` [2048, 2048], float64. The
Fréchet distance is computed in float64.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch

from .metrics import MetricError, frechet_distance, load_ref, statistics  # noqa: F401  (the CLI's math; re-exported)
from .metrics.inception import INCEPTION_FILE, FIDError, features, inception_weights, load_inception  # noqa: F401


def _image_batches(path: str, batch: int):
    """(number of images, an iterator over uint8 batches) of a folder or zip (read in full first)."""
    from .data import ImageFolderDataset

    imgs = ImageFolderDataset(path, use_labels=False).images_as_tensor()
    return len(imgs), (imgs[i:i + batch] for i in range(0, len(imgs), batch))


def _generated_batches(network: str, num: int, batch: int, steps: int, device):
    from .sampling import edm_sampler, seed_labels
    from .snapshots import load_snapshot

    net = load_snapshot(network, device)
    for i in range(0, num, batch):
        seeds = list(range(i, min(i + batch, num)))
        x = edm_sampler(net, seeds, num_steps=steps, class_labels=seed_labels(seeds, net.label_dim, device),
                        device=device)
        yield (x.clamp(-1, 1) * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def _made_with(folder: str):
    """The settings a folder of generate's images records (its generate.json), as one line, or None."""
    from .images import read_image_settings

    try:
        settings = read_image_settings(folder)
        if settings is None:
            return None
        return ", ".join(f"{k} {v[:12] + '...' if k.endswith('sha256') else v}" for k, v in settings.items()
                         if v is not None)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None  # not generate's folder (or a zip): nothing to add


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fdm_fast.fid", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("ref", help="dataset -> reference statistics (.npz with mu, sigma)")
    r.add_argument("--data", required=True, help="dataset zip or folder (EDM format)")
    r.add_argument("--dest", required=True, help="output .npz")
    c = sub.add_parser("calc", help="FID of images (a folder / zip, or generated on the fly) against a reference")
    g = c.add_mutually_exclusive_group(required=True)
    g.add_argument("--images", help="folder or zip of generated images")
    g.add_argument("--network", help="a snapshot to sample from (.pt of fdm_fast.train, official .pkl, "
                                     ".safetensors; a run folder: its newest snapshot)")
    c.add_argument("--ref", required=True, help="reference statistics .npz (from `ref`, or EDM's)")
    c.add_argument("--num", type=int, default=50000, help="images to generate with --network (default 50000)")
    c.add_argument("--steps", type=int, default=18, help="Heun steps with --network (default 18)")
    for p in (r, c):
        p.add_argument("--inception", default=None, help=f"path to {INCEPTION_FILE}")
        p.add_argument("--batch", type=int, default=100, help="images per Inception batch (default 100)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for flag in ("batch", "num", "steps"):
        v = getattr(args, flag, None)
        if v is not None and v < 1:
            print(f"error: --{flag}: expected a positive integer, got {v}", file=sys.stderr)
            return 2
    try:
        if args.cmd == "calc" and args.network:
            from .snapshots import SnapshotError, network_file

            try:  # a run folder stands for its newest snapshot
                given, args.network = args.network, network_file(args.network)
            except SnapshotError as e:
                raise FIDError(f"--network {e}") from None
            if not os.path.isfile(args.network):
                raise FIDError(f"--network {given}: no such file")
            if args.network != given:
                print(f"--network {given}: its newest snapshot, {args.network}", flush=True)
        if args.cmd == "calc" and not os.path.isfile(args.ref):
            raise FIDError(f"--ref {args.ref}: no such file (make one with `python -m fdm_fast.fid ref`)")
        ref = load_ref(args.ref) if args.cmd == "calc" else None  # a bad file fails now, not after the features
        if args.cmd == "ref" or args.images:  # read (and a bad dataset refused) before Inception loads
            num, batches = _image_batches(args.data if args.cmd == "ref" else args.images, args.batch)
        if args.cmd == "ref":  # after the data is read: a bad --data leaves no new folder behind
            from .snapshots import cannot_write

            why = cannot_write(args.dest)  # before any feature is computed
            if why:
                raise FIDError(f"--dest {args.dest}: {why}")
        extractor = load_inception(args.inception, device)
        if args.cmd == "ref":
            mu, sigma = statistics(features(extractor, batches, device, total=num, desc="fid ref"))
            tmp = f"{args.dest}.tmp{os.getpid()}"
            with open(tmp, "wb") as f:  # a file object: np.savez adds no .npz, --dest is the name written
                np.savez(f, mu=mu, sigma=sigma)
            os.replace(tmp, args.dest)
            print(f"wrote {args.dest}")
            return 0
        if not args.images:
            num, batches = args.num, _generated_batches(args.network, args.num, args.batch, args.steps, device)
        mu, sigma = statistics(features(extractor, batches, device, total=num, desc="fid calc"))
        if args.images:
            made = _made_with(args.images)
            if made:
                print(f"{args.images}: {num} images made by generate with {made}")
        print(f"FID {frechet_distance(mu, sigma, *ref):.4f}")
        return 0
    except (FIDError, MetricError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # dataset errors and the like: one line, no traceback
        from .data import DatasetError
        from .snapshots import SnapshotError

        if isinstance(e, (DatasetError, SnapshotError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
