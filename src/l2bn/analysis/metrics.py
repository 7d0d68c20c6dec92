"""Feature-geometry metrics, each defined precisely.

Given features :math:`f_i` with labels :math:`y_i` and class centroids
:math:`\\mu_c = \\mathrm{mean}_{i: y_i = c} f_i`:

* **intra-class compactness** = :math:`\\mathrm{mean}_i \\cos(f_i, \\mu_{y_i})` (1 = every feature
  points exactly at its class centroid); the **mean intra-class angle** is
  :math:`\\mathrm{mean}_i \\arccos \\cos(f_i, \\mu_{y_i})` in degrees.
* **inter-class discrepancy** = the mean and the minimum over class pairs of the angle
  :math:`\\angle(\\mu_a, \\mu_b)` in degrees (90 = orthogonal class means).
* **Fisher ratio** = :math:`\\mathrm{tr}(S_b) / \\mathrm{tr}(S_w)` with
  :math:`S_b = \\sum_c n_c (\\mu_c - \\mu)(\\mu_c - \\mu)^T`, :math:`S_w = \\sum_i (f_i -
  \\mu_{y_i})(f_i - \\mu_{y_i})^T`.
* **k-NN accuracy**: 5-fold cross-validated accuracy (%) of a k-nearest-neighbour classifier
  (cosine distance, scikit-learn) on the features.
"""

from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F
from torch import Tensor

from ..io import BadInput


def _centroids(f: Tensor, y: Tensor):
    classes = torch.unique(y)
    cents = torch.stack([f[y == c].mean(0) for c in classes])
    return classes, cents


def compactness(features: Tensor, labels: Tensor) -> Dict[str, float]:
    """Mean cosine of each feature to its class centroid, and the mean angle (degrees).

    >>> f = torch.tensor([[1., 0.], [2., 0.], [0., 3.]]); y = torch.tensor([0, 0, 1])
    >>> compactness(f, y)["compactness"]
    1.0
    """
    f, y = features.double(), labels
    classes, cents = _centroids(f, y)
    idx = torch.searchsorted(classes, y)
    cos = F.cosine_similarity(f, cents[idx], dim=1, eps=1e-12).clamp(-1, 1)
    return {
        "compactness": float(cos.mean()),
        "intra_class_angle_deg": float(torch.rad2deg(torch.arccos(cos)).mean()),
    }


def discrepancy(features: Tensor, labels: Tensor) -> Dict[str, float]:
    """Mean and minimum angle (degrees) between pairs of class centroids.

    >>> f = torch.eye(3); y = torch.arange(3)
    >>> discrepancy(f, y)["discrepancy_mean_deg"]
    90.0
    """
    _, cents = _centroids(features.double(), labels)
    k = len(cents)
    if k < 2:
        raise BadInput("discrepancy needs at least two classes")
    c = F.normalize(cents, dim=1, eps=1e-12)
    cos = (c @ c.T).clamp(-1, 1)
    iu = torch.triu_indices(k, k, 1)
    ang = torch.rad2deg(torch.arccos(cos[iu[0], iu[1]]))
    return {"discrepancy_mean_deg": float(ang.mean()), "discrepancy_min_deg": float(ang.min())}


def fisher_ratio(features: Tensor, labels: Tensor) -> float:
    """tr(S_b) / tr(S_w) (between-class over within-class scatter)."""
    f = features.double()
    classes, cents = _centroids(f, labels)
    mu = f.mean(0)
    counts = torch.stack([(labels == c).sum() for c in classes]).double()
    sb = float((counts * ((cents - mu) ** 2).sum(1)).sum())
    idx = torch.searchsorted(classes, labels)
    sw = float(((f - cents[idx]) ** 2).sum())
    return sb / sw if sw > 0 else math.inf


def knn_accuracy(
    features: Tensor, labels: Tensor, k: int = 5, folds: int = 5, seed: int = 0
) -> float:
    """Cross-validated k-NN accuracy (%) with cosine distance (scikit-learn)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    x, y = features.double().numpy(), labels.numpy()
    n_min = int(torch.bincount(labels).min()) if len(labels) else 0
    folds = max(2, min(folds, n_min))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    clf = KNeighborsClassifier(n_neighbors=k, metric="cosine")
    return float(100.0 * cross_val_score(clf, x, y, cv=cv).mean())


def feature_metrics(features: Tensor, labels: Tensor, knn: bool = True) -> Dict[str, float]:
    """All of the above in one dict (the keys used in ``analysis.json``)."""
    out: Dict[str, float] = {}
    out.update(compactness(features, labels))
    out.update(discrepancy(features, labels))
    out["fisher_ratio"] = fisher_ratio(features, labels)
    if knn:
        out["knn_accuracy"] = knn_accuracy(features, labels)
    return out
