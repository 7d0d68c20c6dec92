"""Feature metrics beyond the known answers in test_analysis.py: scale invariance, rounding at
cos = 1, error messages, and the k-NN accuracy against scikit-learn called directly."""

import numpy as np
import pytest
import torch
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from l2bn.analysis import compactness, discrepancy, knn_accuracy

# a sample opposite to its class centroid: float64 cosines round to -1 - 2**-52 and 1 + 2**-52
A = [
    0.46636541886786753,
    0.8634864607582904,
    0.041059375136441645,
    0.9972603835252126,
    0.879664099238981,
]
W = [
    0.5582430753802258,
    0.5875289618364469,
    0.6819456856802084,
    0.7453761605775864,
    0.22765563659688126,
]


def test_compactness_is_scale_invariant_down_to_tiny_norms():
    torch.manual_seed(0)
    f = torch.randn(40, 6, dtype=torch.float64)
    y = torch.arange(4).repeat_interleave(10)
    ref = compactness(f, y)
    for scale in (1e-10, 1e5):  # norms ~1e-10: far below cosine_similarity's default eps (1e-8)
        got = compactness(f * scale, y)
        assert got["compactness"] == pytest.approx(ref["compactness"], rel=1e-9)
        assert got["intra_class_angle_deg"] == pytest.approx(ref["intra_class_angle_deg"], rel=1e-9)


def test_angles_are_finite_when_cosines_round_above_one():
    f = torch.tensor([A, [-3 * a for a in A]], dtype=torch.float64)  # centroid -A
    c = compactness(f, torch.tensor([0, 0]))
    assert c["compactness"] == pytest.approx(0.0, abs=1e-12)  # cosines -1 and +1
    assert c["intra_class_angle_deg"] == pytest.approx(90.0, abs=1e-5)  # (180 + 0) / 2, not NaN
    d = discrepancy(
        torch.tensor([W, [7 * w for w in W]], dtype=torch.float64), torch.tensor([0, 1])
    )
    assert d["discrepancy_min_deg"] == pytest.approx(0.0, abs=1e-5) and d[
        "discrepancy_mean_deg"
    ] == pytest.approx(0.0, abs=1e-5)
    # opposite directions: exactly 180 degrees, not NaN
    d2 = discrepancy(
        torch.tensor([W, [-2 * w for w in W]], dtype=torch.float64), torch.tensor([0, 1])
    )
    assert d2["discrepancy_min_deg"] == pytest.approx(180.0, abs=1e-5)


def test_discrepancy_needs_two_classes():
    with pytest.raises(ValueError, match="^discrepancy needs at least two classes$"):
        discrepancy(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))


def _noisy(n_per=40, classes=3, seed=0):
    """Overlapping classes whose samples have very different norms: k-NN accuracy depends on k,
    the folds, the shuffling seed and the metric (cosine vs euclidean)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, 8, generator=g, dtype=torch.float64)
    y = torch.arange(classes).repeat_interleave(n_per)
    f = centers[y] + 1.3 * torch.randn(len(y), 8, generator=g, dtype=torch.float64)
    f = f * torch.exp(2 * torch.randn(len(y), 1, generator=g, dtype=torch.float64))
    return f, y


def _sklearn(f, y, k, folds, seed, metric="cosine"):
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    clf = KNeighborsClassifier(n_neighbors=k, metric=metric)
    return 100.0 * cross_val_score(clf, f.numpy(), y.numpy(), cv=cv).mean()


def test_knn_accuracy_equals_scikit_learn():
    f, y = _noisy()
    got = knn_accuracy(f, y)
    assert got == pytest.approx(_sklearn(f, y, 5, 5, 0), abs=1e-12)
    assert 40 < got < 95  # not at a ceiling where every setting agrees
    # each setting matters on these features, so a different default would be seen
    others = [
        _sklearn(f, y, 6, 5, 0),
        _sklearn(f, y, 5, 6, 0),
        _sklearn(f, y, 5, 5, 1),
        _sklearn(f, y, 5, 5, 0, "euclidean"),
    ]
    assert all(abs(o - got) > 1e-9 for o in others)
    assert knn_accuracy(f, y, k=3, folds=4, seed=2) == pytest.approx(
        _sklearn(f, y, 3, 4, 2), abs=1e-12
    )


def test_knn_folds_shrink_to_the_smallest_class():
    f, y = _noisy(n_per=40)
    keep = torch.cat([torch.arange(0, 3), torch.arange(40, 120)])  # class 0 has 3 samples
    f3, y3 = f[keep], y[keep]
    assert knn_accuracy(f3, y3, k=1) == pytest.approx(_sklearn(f3, y3, 1, 3, 0), abs=1e-12)
    keep2 = torch.cat([torch.arange(0, 2), torch.arange(40, 120)])  # 2 samples: 2 folds
    f2, y2 = f[keep2], y[keep2]
    assert knn_accuracy(f2, y2, k=1) == pytest.approx(_sklearn(f2, y2, 1, 2, 0), abs=1e-12)
    assert np.isfinite(knn_accuracy(f2, y2, k=1))
