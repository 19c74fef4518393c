"""The run's sample order: one global sequence of dataset indices, a function of (seed, position).

Position ``g`` (0, 1, 2, ... over the whole run) is sample ``perm_e[g % N]`` of epoch ``e = g // N``,
``perm_e`` a permutation of the N images seeded by ``(seed, e)``. Optimizer step ``s`` trains on
positions ``[s * batch, (s + 1) * batch)``; with W ranks, rank ``r`` takes the slice
``[s * batch + r * batch / W, ...)`` of it and splits that further into its accumulation rounds. A
sample's key (which seeds its sigma, flip, augmentation and noise) is its position. So the samples,
their keys and their randomness depend on neither the number of ranks nor the dataset size's
divisibility, every epoch covers every image once, and a resumed run continues from its step alone.
"""

from __future__ import annotations

import numpy as np


class GlobalOrder:
    def __init__(self, size: int, seed: int):
        if size < 1:
            raise ValueError(f"size: expected a dataset of at least one image, got {size}")
        self.size, self.seed = size, seed
        self._perms: dict = {}

    def _perm(self, epoch: int) -> np.ndarray:
        p = self._perms.get(epoch)
        if p is None:
            p = np.random.default_rng([self.seed, epoch]).permutation(self.size)
            self._perms = {e: q for e, q in self._perms.items() if e >= epoch - 1}  # keep the last two
            self._perms[epoch] = p
        return p

    def indices(self, start: int, n: int) -> np.ndarray:
        """Dataset indices at positions ``start .. start + n - 1`` (int64)."""
        pos = np.arange(start, start + n, dtype=np.int64)
        out = np.empty(n, dtype=np.int64)
        epochs = pos // self.size
        for e in np.unique(epochs):
            m = epochs == e
            out[m] = self._perm(int(e))[pos[m] % self.size]
        return out
