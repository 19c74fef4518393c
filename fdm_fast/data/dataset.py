"""Datasets in EDM's format: a folder of PNG/JPEG images or an uncompressed zip of them, with an
optional ``dataset.json`` (``{"labels": [["00000/img00000000.png", 6], ...]}``); and the embedded
default, scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, no download).

Items are (uint8 array [C, H, W], float32 one-hot label [label_dim] or [0]). The whole dataset is
decoded once into memory (``cache``): the training loop then never waits on image decoding.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from typing import Optional

import numpy as np
import torch

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


class DatasetError(Exception):
    """A dataset that cannot be opened or read; its message says what to do (the CLI prints it alone)."""


class ImageDataset(torch.utils.data.Dataset):
    """Base: subclasses fill ``self._images`` (uint8 [N, C, H, W]) and ``self._labels`` (int64 [N] or None)."""

    name = "dataset"
    _images: np.ndarray
    _labels: Optional[np.ndarray]
    label_dim = 0

    def __len__(self) -> int:
        return len(self._images)

    @property
    def resolution(self) -> int:
        return int(self._images.shape[-1])

    @property
    def num_channels(self) -> int:
        return int(self._images.shape[1])

    def _one_hot(self, idx: int) -> np.ndarray:
        out = np.zeros([self.label_dim], dtype=np.float32)
        if self.label_dim:
            out[self._labels[idx]] = 1
        return out

    def __getitem__(self, idx):
        return self._images[idx], self._one_hot(idx)

    def images_as_tensor(self) -> torch.Tensor:
        return torch.from_numpy(self._images)


def _decode(data: bytes, fname: str) -> np.ndarray:
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            im.load()
            arr = np.asarray(im)
    except Exception as e:
        raise DatasetError(f"{fname}: cannot read this image ({type(e).__name__}: {e})") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise DatasetError(f"{fname}: expected a grayscale or RGB image, got array shape {arr.shape}")
    return arr[:, :, :3].transpose(2, 0, 1)


class ImageFolderDataset(ImageDataset):
    """EDM's dataset format from a folder or an uncompressed zip; all images must share one shape."""

    def __init__(self, path: str, use_labels: bool = True, max_size: Optional[int] = None):
        self.path = path
        self.name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
        zf = None
        if os.path.isdir(path):
            files = sorted(os.path.relpath(os.path.join(root, f), path).replace(os.sep, "/")
                           for root, _, fs in os.walk(path) for f in fs)

            def read(f):
                with open(os.path.join(path, f), "rb") as fh:
                    return fh.read()
        elif os.path.isfile(path) and zipfile.is_zipfile(path):
            zf = zipfile.ZipFile(path)
            files = sorted(zf.namelist())

            def read(f):
                try:
                    return zf.read(f)
                except (zipfile.BadZipFile, OSError, EOFError) as e:  # bad CRC, truncated member
                    raise DatasetError(f"{path}/{f}: the zip member is damaged ({e})") from None
        else:
            raise DatasetError(f"{path}: not a folder or a zip file of images")
        try:
            self._read_all(path, files, read, use_labels, max_size)
        finally:  # every image is in memory now: the zip is not needed again
            if zf is not None:
                zf.close()

    def _read_all(self, path, files, read, use_labels, max_size):
        """Decode the images among ``files`` (and dataset.json's labels), each read with ``read(name)``."""
        images = [f for f in files if f.lower().endswith(IMAGE_EXT)]
        if not images:
            raise DatasetError(f"{path}: contains no images ({', '.join(IMAGE_EXT)})")
        if max_size is not None:
            images = images[:max_size]
        arrays = [_decode(read(f), f"{path}/{f}") for f in images]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise DatasetError(f"{path}: images differ in shape {sorted(shapes)[:3]}...; prepare the dataset with "
                               "`python -m fdm_fast.dataset_tool --resolution R`")
        self._images = np.stack(arrays)
        if self._images.shape[2] != self._images.shape[3]:
            raise DatasetError(f"{path}: images must be square, got {self._images.shape[2:]}")
        self._labels = None
        if use_labels and "dataset.json" in files:
            try:
                labels = dict(json.loads(read("dataset.json")).get("labels") or [])
            except (ValueError, TypeError, AttributeError) as e:
                raise DatasetError(f"{path}/dataset.json: not a valid dataset.json "
                                   f"({{\"labels\": [[file, label], ...]}}): {e}") from None
            if labels:
                missing = [f for f in images if f not in labels]
                if missing:
                    raise DatasetError(f"{path}/dataset.json: no label for {missing[0]}")
                self._labels = np.array([labels[f] for f in images], dtype=np.int64)
                self.label_dim = int(self._labels.max()) + 1


class DigitsDataset(ImageDataset):
    """scikit-learn's bundled handwritten digits (1,797 scans of 8x8, 17 gray levels), upsampled
    bilinearly to ``resolution`` and scaled to uint8. Needs no download: the data ships with sklearn."""

    name = "digits"

    def __init__(self, resolution: int = 16, use_labels: bool = True):
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:
            raise DatasetError("--ds digits needs scikit-learn (pip install scikit-learn)") from e
        d = load_digits()
        x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # [N, 1, 8, 8] in [0, 1]
        if resolution != 8:
            x = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
        self._images = (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        self._labels = d.target.astype(np.int64) if use_labels else None
        self.label_dim = 10 if use_labels else 0


class SyntheticDataset(ImageDataset):
    """Seeded random RGB images with 10 labels: a stand-in of any resolution for benchmarks and tests
    (``--ds synthetic --resolution 64`` sizes a training step like FFHQ-64's). Nothing to learn."""

    name = "synthetic"

    def __init__(self, resolution: int = 32, use_labels: bool = True, size: int = 2048, channels: int = 3):
        g = np.random.default_rng(0)
        self._images = g.integers(0, 256, (size, channels, resolution, resolution), dtype=np.uint8)
        self._labels = g.integers(0, 10, size).astype(np.int64) if use_labels else None
        self.label_dim = 10 if use_labels else 0
