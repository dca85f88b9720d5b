"""Distances between sets of vectors (face descriptors, latents, thumbnails): the one implementation."""

from __future__ import annotations

import math

import numpy as np
import torch


def _flat(vectors) -> torch.Tensor:
    return torch.as_tensor(np.asarray(vectors) if not isinstance(vectors, torch.Tensor) else vectors).flatten(1).double().cpu()


def pairwise_distances(a, b, per_element: bool = False) -> torch.Tensor:
    """Euclidean distances between the rows of `a` (N x ...) and `b` (M x ...), N x M float64; divided by
    sqrt(dimension) with `per_element` (an RMS difference per element, comparable across sizes)."""
    a, b = _flat(a), _flat(b)
    distances = torch.cdist(a, b)
    return distances / math.sqrt(a.shape[1]) if per_element else distances


def nearest_distances(samples, references, per_element: bool = False) -> torch.Tensor:
    """Per sample, the distance to the closest reference."""
    return pairwise_distances(samples, references, per_element).min(dim=1).values


def mean_pairwise_distance(vectors, per_element: bool = False) -> float | None:
    """Mean distance between two different vectors of a set: how diverse it is; None for fewer than two."""
    count = len(vectors)
    if count < 2:
        return None
    distances = pairwise_distances(vectors, vectors, per_element)
    return float(distances.sum() / (count * (count - 1)))


def paired_distances(a, b, per_element: bool = False) -> torch.Tensor:
    """Row i of `a` against row i of `b` (the same N): e.g. two samplers' images from the same noise."""
    a, b = _flat(a), _flat(b)
    distances = (a - b).norm(dim=1)
    return distances / math.sqrt(a.shape[1]) if per_element else distances
