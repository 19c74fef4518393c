r"""Build a dataset in EDM's format: ``python -m fdm_fast.dataset_tool --source SRC --dest DEST``.

SRC: a folder of images (searched recursively), a zip of images, or the CIFAR-10 python tarball
(``cifar-10-python.tar.gz``). DEST: an uncompressed ``.zip`` (what training reads fastest) or a
folder. Images are written as ``00000/img00000000.png`` with ``dataset.json`` holding the labels
(CIFAR-10's classes; for folders and zips, a ``dataset.json`` in the source is carried over).
``--resolution R`` center-crops each image to a square and resizes it to R x R; without it all images
must already share one square size. An unreadable image stops the tool with its file name.

    python -m fdm_fast.dataset_tool --source downloads/cifar-10-python.tar.gz --dest datasets/cifar10-32x32.zip
    python -m fdm_fast.dataset_tool --source downloads/ffhq/images1024x1024 \
        --dest datasets/ffhq-64x64.zip --resolution 64
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import sys
import tarfile
import shutil
import zipfile
from typing import Iterator, Optional

import numpy as np

from .data.dataset import IMAGE_EXT, DatasetError
from .snapshots import cannot_write, missing_folders, remove_empty_folders


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10's batches are pickles: allow only the numpy classes they hold, never arbitrary code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch")


def _open_image(data: bytes, name: str):
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        return im
    except Exception as e:
        raise DatasetError(f"{name}: cannot read this image ({type(e).__name__}: {e})") from None


def iterate_source(source: str, max_images: Optional[int]) -> Iterator[tuple[str, object, Optional[int]]]:
    """(name, PIL image, label or None) for each image of the source."""
    if os.path.isdir(source):
        files = sorted(os.path.relpath(os.path.join(r, f), source).replace(os.sep, "/")
                       for r, _, fs in os.walk(source) for f in fs if f.lower().endswith(IMAGE_EXT))
        labels = _labels(os.path.join(source, "dataset.json")) if os.path.exists(os.path.join(source,
                                                                                               "dataset.json")) else {}
        for f in files[:max_images]:
            with open(os.path.join(source, f), "rb") as fh:
                yield f, _open_image(fh.read(), os.path.join(source, f)), labels.get(f)
    elif source.endswith((".tar.gz", ".tgz")) and tarfile.is_tarfile(source):
        with tarfile.open(source) as tar:
            names = sorted(m.name for m in tar.getmembers() if "data_batch_" in m.name or "test_batch" in m.name)
            batches = [n for n in names if "data_batch_" in n]
            if not batches:
                raise DatasetError(f"{source}: not the CIFAR-10 python tarball (no data_batch_* inside)")
            count = 0
            for n in batches:
                d = _NumpyOnlyUnpickler(tar.extractfile(n), encoding="bytes").load()
                images = d[b"data"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
                for k, (img, lab) in enumerate(zip(images, d[b"labels"])):
                    if max_images is not None and count >= max_images:
                        return
                    from PIL import Image

                    yield f"{n}[{k}]", Image.fromarray(img), int(lab)
                    count += 1
    elif zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as zf:
            files = sorted(f for f in zf.namelist() if f.lower().endswith(IMAGE_EXT))
            labels = _labels_bytes(_zip_read(zf, "dataset.json", source), f"{source}/dataset.json") \
                if "dataset.json" in zf.namelist() else {}
            for f in files[:max_images]:
                yield f, _open_image(_zip_read(zf, f, source), f"{source}/{f}"), labels.get(f)
    else:
        raise DatasetError(f"--source {source}: expected a folder, a zip of images or cifar-10-python.tar.gz")


def _zip_read(zf, name: str, source: str) -> bytes:
    try:
        return zf.read(name)
    except (zipfile.BadZipFile, OSError, EOFError) as e:  # bad CRC, truncated member
        raise DatasetError(f"{source}/{name}: the zip member is damaged ({e})") from None


def _labels_bytes(data: bytes, where: str = "dataset.json") -> dict:
    try:
        return dict(json.loads(data).get("labels") or [])
    except (ValueError, TypeError, AttributeError) as e:
        raise DatasetError(f"{where}: not a valid dataset.json ({{\"labels\": [[file, label], ...]}}): {e}") from None


def _labels(path: str) -> dict:
    with open(path, "rb") as f:
        return _labels_bytes(f.read(), path)


def center_crop_resize(im, resolution: int):
    from PIL import Image

    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return im.resize((resolution, resolution), Image.LANCZOS) if s != resolution else im


def convert(source: str, dest: str, resolution: Optional[int] = None, max_images: Optional[int] = None,
            progress: bool = True) -> dict:
    """Write the dataset; returns a summary (count, resolution, channels, labelled)."""
    is_zip = dest.lower().endswith(".zip")
    if not os.path.exists(source):
        raise DatasetError(f"--source {source}: no such file or folder")
    if os.path.exists(dest):
        raise DatasetError(f"--dest {dest}: already exists; remove it or choose another path")
    made = missing_folders(os.path.dirname(os.path.abspath(dest)))
    why = cannot_write(dest)
    if why:
        remove_empty_folders(made)
        raise DatasetError(f"--dest {dest}: {why}")
    tmp = dest + ".partial"
    try:
        return _convert(source, dest, tmp, is_zip, resolution, max_images, progress)
    except BaseException:
        # nothing half-written stays behind, whatever failed (a bad file, a full disk, Ctrl-C), nor the
        # folders made for it
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        remove_empty_folders(made)
        raise


def _convert(source, dest, tmp, is_zip, resolution, max_images, progress):
    zf = zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) if is_zip else None
    if not is_zip:
        os.makedirs(tmp, exist_ok=True)
    labels, shape, mode = [], None, None
    it = iterate_source(source, max_images)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, unit="img", desc="dataset_tool", mininterval=1.0)
    for idx, (name, im, label) in enumerate(it):
        mode = mode or ("L" if im.mode in ("L", "1", "I;16", "I") else "RGB")
        im = im.convert(mode)
        if resolution is not None:
            im = center_crop_resize(im, resolution)
        arr = np.asarray(im)
        if shape is None:
            shape = arr.shape
            if resolution is None and arr.shape[0] != arr.shape[1]:
                raise DatasetError(f"{name}: {arr.shape[1]}x{arr.shape[0]} is not square; pass --resolution R")
        elif arr.shape != shape:
            raise DatasetError(f"{name}: size {arr.shape} differs from the first image's {shape}; pass --resolution R")
        rel = f"{idx // 1000:05d}/img{idx:08d}.png"
        buf = io.BytesIO()
        im.save(buf, format="png", compress_level=0, optimize=False)
        if zf:
            zf.writestr(rel, buf.getvalue())
        else:
            os.makedirs(os.path.join(tmp, os.path.dirname(rel)), exist_ok=True)
            with open(os.path.join(tmp, rel), "wb") as f:
                f.write(buf.getvalue())
        if label is not None:
            labels.append([rel, int(label)])
    if shape is None:
        raise DatasetError(f"--source {source}: no images found")
    meta = json.dumps({"labels": labels if labels else None})
    if zf:
        zf.writestr("dataset.json", meta)
        zf.close()
    else:
        with open(os.path.join(tmp, "dataset.json"), "w") as f:
            f.write(meta)
    os.replace(tmp, dest)  # the destination appears only when complete
    return dict(count=idx + 1, resolution=shape[0], channels=1 if len(shape) == 2 else shape[2], labelled=bool(labels))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fdm_fast.dataset_tool", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, help="image folder, zip of images, or cifar-10-python.tar.gz")
    ap.add_argument("--dest", required=True, help="output .zip (uncompressed) or folder")
    ap.add_argument("--resolution", type=int, default=None, help="center-crop to square and resize to R x R")
    ap.add_argument("--max-images", type=int, default=None, help="stop after this many images")
    args = ap.parse_args(argv)
    if args.resolution is not None and args.resolution < 1:
        print(f"error: --resolution: expected a positive size, got {args.resolution}", file=sys.stderr)
        return 2
    if args.max_images is not None and args.max_images < 1:
        print(f"error: --max-images: expected a positive count, got {args.max_images}", file=sys.stderr)
        return 2
    try:
        s = convert(args.source, args.dest, args.resolution, args.max_images)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {s['count']} images of {s['resolution']}x{s['resolution']}x{s['channels']}"
          f"{' with labels' if s['labelled'] else ''} to {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
