"""Inception-v3 features for FID (torch-fidelity's ``inception-v3-compat``, which matches the TensorFlow
Inception of the FID literature). Its weights are never downloaded: ``inception_weights`` finds the file
(``--inception PATH``, ``$FDM_FAST_INCEPTION``, or torch hub's checkpoint cache) or says which file is
needed. Used by the ``fid`` tool, by ``--metric fid`` during training and by the benchmarks."""

from __future__ import annotations

import os
from typing import Iterable, Optional

import numpy as np
import torch

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


class FIDError(Exception):
    """A missing input or dependency; the message says what to provide (printed alone by the CLI)."""


def inception_weights(path: Optional[str]) -> str:
    candidates = [path, os.environ.get("FDM_FAST_INCEPTION"),
                  os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_FILE)]
    for c in candidates:
        if c and os.path.isfile(c):
            return c
    if path:
        raise FIDError(f"--inception {path}: no such file (expected {INCEPTION_FILE})")
    raise FIDError(f"FID needs the Inception-v3 weights {INCEPTION_FILE} (torch-fidelity's 'inception-v3-compat', "
                   f"converted from TensorFlow's), which this tool does not download. Get the file, then pass "
                   f"--inception PATH, set FDM_FAST_INCEPTION, or place it in "
                   f"{os.path.join(torch.hub.get_dir(), 'checkpoints')}/")


def load_inception(path: Optional[str], device):
    weights = inception_weights(path)
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except Exception as e:
        raise FIDError(f"torch-fidelity is not importable ({type(e).__name__}: {e}); install torch-fidelity and a "
                       "torchvision that matches your torch") from None
    return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                       feature_extractor_weights_path=weights).to(device).eval()


@torch.no_grad()
def features(extractor, batches: Iterable[torch.Tensor], device, *, total: Optional[int] = None,
             desc: Optional[str] = None) -> np.ndarray:
    """2048-d features of uint8 image batches [B, C, H, W] (grayscale repeated to RGB). With ``desc``, a
    progress bar in images (of ``total``) on stderr."""
    bar = None
    if desc is not None:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", desc=desc, mininterval=1.0, dynamic_ncols=True)
    out = []
    try:
        for x in batches:
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            f = extractor(x.to(device))
            out.append((f[0] if isinstance(f, (tuple, list)) else f).double().cpu().numpy())
            if bar is not None:
                bar.update(len(x))
    finally:
        if bar is not None:
            bar.close()
    return np.concatenate(out)
