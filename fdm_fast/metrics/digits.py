"""Quality of generated 16x16 digits, offline: a small CNN trained on the embedded digits.

The classifier (two conv blocks and two linear layers, 64-d penultimate features) trains in seconds
on the CPU, deterministically (fixed seed, fixed split, full-batch order by seed), on the train split
of scikit-learn's digits upsampled to 16x16 as ``--ds digits`` serves them; its accuracy on the
held-out test split is reported. The trained weights are cached in ``$FDM_FAST_CACHE`` (default
``~/.cache/fdm_fast``) under a name that hashes the network's definition and its training recipe, so a
change to either retrains it.

``DigitsMetrics.evaluate(images)`` compares images in [-1, 1] ([N, 1, 16, 16]) with the test split:
Fréchet distance on the features (``fd``), KID, precision and recall, class coverage (total variation
distance of the predicted-class histogram from uniform, and the number of classes seen), and a
pixel-space Fréchet distance (``pixel_fd``).
"""

from __future__ import annotations

import hashlib
import inspect
import os
from typing import Optional

import numpy as np
import torch
from torch import nn

from . import fd, kid, precision_recall

RECIPE = dict(seed=0, epochs=12, lr=2e-3, batch=64, test_fraction=0.25, resolution=16)


class DigitsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.body(x))

    def features(self, x):
        return self.body(x)


def _key() -> str:
    src = inspect.getsource(DigitsNet) + repr(sorted(RECIPE.items()))
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def cache_dir() -> str:
    return os.environ.get("FDM_FAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fdm_fast")


def digits_split():
    """(train images, train labels, test images, test labels): uint8 [N, 1, 16, 16] and int64, a fixed split."""
    from ..data import DigitsDataset

    ds = DigitsDataset(resolution=RECIPE["resolution"], use_labels=True)
    x, y = ds.images_as_tensor(), torch.from_numpy(ds._labels)
    perm = torch.from_numpy(np.random.default_rng(RECIPE["seed"]).permutation(len(x)))
    n_test = int(len(x) * RECIPE["test_fraction"])
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def _as_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [-1, 1] images -> float [-1, 1]."""
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1
    return images.float().clamp(-1, 1)


def train_classifier(log=lambda *a: None) -> tuple[DigitsNet, float]:
    """The classifier trained from scratch by the recipe, and its test accuracy."""
    xtr, ytr, xte, yte = digits_split()
    g = torch.Generator().manual_seed(RECIPE["seed"])
    torch_state = torch.get_rng_state()
    torch.manual_seed(RECIPE["seed"])
    net = DigitsNet()
    torch.set_rng_state(torch_state)  # leave the caller's generator as it was
    opt = torch.optim.Adam(net.parameters(), lr=RECIPE["lr"])
    xtr_f = _as_input(xtr)
    for epoch in range(RECIPE["epochs"]):
        order = torch.randperm(len(xtr_f), generator=g)
        for i in range(0, len(order), RECIPE["batch"]):
            idx = order[i:i + RECIPE["batch"]]
            loss = nn.functional.cross_entropy(net(xtr_f[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(_as_input(xte)).argmax(1) == yte).float().mean().item()
    log(f"digits classifier: test accuracy {acc:.4f}")
    return net, acc


def load_classifier(log=lambda *a: None) -> tuple[DigitsNet, float]:
    """The cached classifier (trained and cached first when absent or when its definition changed)."""
    path = os.path.join(cache_dir(), f"digits-classifier-{_key()}.pt")
    if os.path.isfile(path):
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
            net = DigitsNet()
            net.load_state_dict(data["state"])
            return net.eval(), float(data["accuracy"])
        except Exception:  # a damaged cache file: retrain
            pass
    net, acc = train_classifier(log)
    os.makedirs(cache_dir(), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(dict(state=net.state_dict(), accuracy=acc, recipe=RECIPE), tmp)
    os.replace(tmp, path)
    return net, acc


class DigitsMetrics:
    """Metrics of generated digits against the held-out test split (see the module docstring)."""

    def __init__(self, log=lambda *a: None):
        self.net, self.accuracy = load_classifier(log)
        _, _, xte, _ = digits_split()
        self.reference = _as_input(xte)
        self.ref_feats = self.features(self.reference)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> np.ndarray:
        x = _as_input(images).cpu()
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, 16, 16):
            raise ValueError(f"images: expected [N, 1, 16, 16], got {tuple(x.shape)}")
        return torch.cat([self.net.features(x[i:i + 512]) for i in range(0, len(x), 512)]).double().numpy()

    @torch.no_grad()
    def classes(self, images: torch.Tensor) -> np.ndarray:
        x = _as_input(images).cpu()
        return torch.cat([self.net(x[i:i + 512]).argmax(1) for i in range(0, len(x), 512)]).numpy()

    def evaluate(self, images: torch.Tensor, reference: Optional[torch.Tensor] = None) -> dict:
        ref = self.reference if reference is None else _as_input(reference)
        ref_feats = self.ref_feats if reference is None else self.features(ref)
        feats = self.features(images)
        hist = np.bincount(self.classes(images), minlength=10) / len(images)
        precision, recall = precision_recall(ref_feats, feats)
        return dict(fd=fd(ref_feats, feats), kid=kid(ref_feats, feats), precision=precision, recall=recall,
                    class_tv=float(0.5 * np.abs(hist - 0.1).sum()), classes_seen=int((hist > 0).sum()),
                    pixel_fd=fd(ref.reshape(len(ref), -1).double().numpy(),
                                _as_input(images).reshape(len(images), -1).double().numpy()))
