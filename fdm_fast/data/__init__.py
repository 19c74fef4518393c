"""Datasets: EDM's zip/folder format, the embedded digits default, and the named recipes' paths."""

from __future__ import annotations

import os
from typing import Optional

from .dataset import DatasetError, DigitsDataset, ImageDataset, ImageFolderDataset, SyntheticDataset  # noqa: F401

# Where `--ds NAME` looks unless --data is given, and how to prepare each file.
DEFAULT_PATHS = {
    "cifar10": "datasets/cifar10-32x32.zip",
    "ffhq": "datasets/ffhq-64x64.zip",
    "afhqv2": "datasets/afhqv2-64x64.zip",
}
PREPARE = {
    "cifar10": "python -m fdm_fast.dataset_tool --source downloads/cifar-10-python.tar.gz "
               "--dest datasets/cifar10-32x32.zip",
    "ffhq": "python -m fdm_fast.dataset_tool --source downloads/ffhq/images1024x1024 "
            "--dest datasets/ffhq-64x64.zip --resolution 64",
    "afhqv2": "python -m fdm_fast.dataset_tool --source downloads/afhqv2 --dest datasets/afhqv2-64x64.zip "
              "--resolution 64",
}


def open_dataset(ds: str, data: Optional[str] = None, *, use_labels: bool = False,
                 resolution: Optional[int] = None) -> ImageDataset:
    """The dataset ``--ds`` names (cifar10, ffhq, afhqv2, digits, or a path), at ``--data`` if given."""
    if ds == "digits" and data is None:
        return DigitsDataset(resolution=16 if resolution is None else resolution, use_labels=use_labels)
    if ds == "synthetic" and data is None:
        return SyntheticDataset(resolution=32 if resolution is None else resolution, use_labels=use_labels)
    path = data or DEFAULT_PATHS.get(ds, ds)
    if not os.path.exists(path):
        if ds in PREPARE and data is None:
            raise DatasetError(f"--ds {ds}: {path} not found. Download its source by hand, then prepare it with "
                               f"the dataset tool:\n  {PREPARE[ds]}\nor pass --data PATH to a prepared zip or folder.")
        raise DatasetError(f"{'--data' if data else '--ds'} {path}: no such file or folder")
    dataset = ImageFolderDataset(path, use_labels=use_labels)
    if resolution is not None and dataset.resolution != resolution:
        raise DatasetError(f"{path}: images are {dataset.resolution}x{dataset.resolution}, the run expects "
                           f"{resolution}x{resolution}; rebuild it with the dataset tool's --resolution")
    return dataset
