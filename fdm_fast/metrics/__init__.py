"""Sample-quality metrics that work offline.

- ``frechet_distance`` / ``statistics``: the Fréchet distance between Gaussians fitted to features, in
  float64 (FID when the features are Inception's, ``fdm_fast.fid``).
- ``kid``: kernel inception distance (unbiased MMD^2, cubic polynomial kernel, averaged over subsets).
- ``precision_recall``: k-NN manifold precision and recall (Kynkäänniemi et al. 2019).
- ``fdm_fast.metrics.digits``: a small CNN trained deterministically on the embedded digits, whose
  penultimate features make these metrics meaningful for 16x16 digits (FID is not, and its weights
  cannot be downloaded here), with class coverage and a pixel-space Fréchet distance beside them.
"""

from __future__ import annotations

import zipfile
import zlib

import numpy as np


class MetricError(ValueError):
    """Bad input to a metric (shapes, too few samples)."""


def load_ref(path, flag: str = "--ref"):
    """(mu [D], sigma [D, D]) in float64 from reference statistics (``python -m fdm_fast.fid ref``, or
    EDM's ``.npz``), checked: a file that is not such statistics is a MetricError naming ``flag``, raised
    before a tool spends any time on features."""
    def unreadable(e):
        return MetricError(f"{flag} {path}: not reference statistics with 'mu' and 'sigma' ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else 'unreadable'})")

    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise unreadable(e) from None
    if head.startswith(b"\x93NUMPY"):
        raise MetricError(f"{flag} {path}: expected an .npz with 'mu' and 'sigma', got a single array (.npy)")
    if not head.startswith(b"PK\x03\x04"):  # numpy would take any other file for a pickle
        raise MetricError(f"{flag} {path}: not reference statistics with 'mu' and 'sigma': not an .npz file "
                          f"(it begins {head!r})")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise unreadable(e) from None
    with z:
        missing = [k for k in ("mu", "sigma") if k not in z.files]
        if missing:
            raise MetricError(f"{flag} {path}: expected arrays 'mu' and 'sigma', it has {z.files} (missing {missing})")
        try:
            mu, sigma = z["mu"].astype(np.float64), z["sigma"].astype(np.float64)
        except (ValueError, TypeError) as e:
            raise MetricError(f"{flag} {path}: 'mu' and 'sigma' are not numeric arrays ({e})") from None
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise MetricError(f"{flag} {path}: damaged ({type(e).__name__}: {e})") from None
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise MetricError(f"{flag} {path}: expected mu [D] and sigma [D, D], "
                          f"got {list(mu.shape)} and {list(sigma.shape)}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise MetricError(f"{flag} {path}: mu or sigma holds NaN or inf")
    return mu, sigma


def statistics(feats: np.ndarray):
    """(mean, covariance) of features [N, D], float64."""
    feats = np.asarray(feats, np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise MetricError(f"features: expected [N >= 2, D], got shape {feats.shape}")
    return feats.mean(0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64.

    Tr (S1 S2)^(1/2) = Tr (A S2 A)^(1/2) with A = S1^(1/2): both square roots are of symmetric PSD
    matrices, taken by eigendecomposition (stabler than a general matrix square root)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise MetricError(f"statistics: shapes differ ({mu1.shape}, {s1.shape}) vs ({mu2.shape}, {s2.shape})")
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = a @ s2 @ a
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def fd(feats_a, feats_b) -> float:
    """Fréchet distance between two feature sets."""
    return frechet_distance(*statistics(feats_a), *statistics(feats_b))


def kid(feats_a, feats_b, subsets: int = 20, subset_size: int = 500, seed: int = 0) -> float:
    """Kernel distance: unbiased MMD^2 with k(x, y) = (x.y / D + 1)^3, averaged over random subsets."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    n = min(subset_size, len(a), len(b))
    if n < 2:
        raise MetricError("kid: expected at least 2 samples in each set")
    g = np.random.default_rng(seed)
    d = a.shape[1]
    out = []
    for _ in range(subsets):
        x, y = a[g.choice(len(a), n, replace=False)], b[g.choice(len(b), n, replace=False)]
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        out.append((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean())
    return float(np.mean(out))


def _radii(x: np.ndarray, k: int) -> np.ndarray:
    d = np.sqrt(np.maximum(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1), 0))
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself


def precision_recall(real, fake, k: int = 3) -> tuple[float, float]:
    """Fraction of fake samples inside the real k-NN manifold (precision), and of real inside the fake
    one (recall); the manifolds are unions of balls reaching each point's k-th nearest neighbour."""
    r, f = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    if len(r) <= k or len(f) <= k:
        raise MetricError(f"precision_recall: expected more than k = {k} samples in each set")
    rr, rf = _radii(r, k), _radii(f, k)
    d = np.sqrt(np.maximum(((f[:, None, :] - r[None, :, :]) ** 2).sum(-1), 0))  # [fake, real]
    precision = float((d <= rr[None, :]).any(1).mean())
    recall = float((d.T <= rf[None, :]).any(1).mean())
    return precision, recall


def bootstrap(fn, a, b, n: int = 50, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """(value, low, high): ``fn(a, b)`` and a ``level`` interval of its sampling spread, from ``n``
    bootstrap resamples of both sets. Resampling duplicates points, which biases distances such as FD
    upward, so the interval is the resamples' spread around their median, placed around the observed
    value (low = value - (median - q_low), high = value + (q_high - median))."""
    a, b = np.asarray(a), np.asarray(b)
    g = np.random.default_rng(seed)
    vals = np.array([fn(a[g.integers(0, len(a), len(a))], b[g.integers(0, len(b), len(b))]) for _ in range(n)])
    q_lo, med, q_hi = np.quantile(vals, [(1 - level) / 2, 0.5, 1 - (1 - level) / 2])
    value = float(fn(a, b))
    return value, float(value - (med - q_lo)), float(value + (q_hi - med))
