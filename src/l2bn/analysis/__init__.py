"""Measure what the paper claims: per-layer spread of sample norms at the normalization inputs,
intra-class compactness and inter-class discrepancy of the penultimate features."""

from .metrics import compactness, discrepancy, feature_metrics, fisher_ratio, knn_accuracy
from .probes import FeatureProbe, NormInputProbe, norm_layers

__all__ = [
    "NormInputProbe",
    "FeatureProbe",
    "norm_layers",
    "compactness",
    "discrepancy",
    "fisher_ratio",
    "knn_accuracy",
    "feature_metrics",
]
