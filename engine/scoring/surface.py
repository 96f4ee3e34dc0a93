"""Surfaces of binary masks and the distances between them, computed once per label.

Edge mode (default, MONAI-compatible): a surface voxel is a foreground voxel with
at least one background voxel among its 6 face neighbours, the outside of the
image counting as background (`mask XOR binary_erosion(mask)`). Distances are
Euclidean, in millimetres, from each surface voxel of one mask to the nearest
surface voxel of the other, exactly: a KD-tree over the surface voxels' physical
coordinates gives the same values as a distance transform, without visiting the
volume. Voxels on both surfaces are at distance 0 and are not queried.

Everything runs on the bounding box of the union of both masks (plus one voxel),
so a small structure in a large image costs little.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

KDTREE_LEAF_SIZE = 32


@dataclass(frozen=True)
class SurfaceDistances:
    pred_to_ref: np.ndarray  # one distance (mm) per prediction surface voxel
    ref_to_pred: np.ndarray  # one distance (mm) per reference surface voxel
    pred_areas: np.ndarray | None = None  # subvoxel mode: area (mm^2) of each surface element
    ref_areas: np.ndarray | None = None


def bounding_box(*masks: np.ndarray, margin: int = 1) -> tuple[slice, ...] | None:
    """The smallest box holding every foreground voxel of the masks, grown by `margin`."""
    slices = []
    for axis in range(masks[0].ndim):
        others = tuple(a for a in range(masks[0].ndim) if a != axis)
        present = np.zeros(masks[0].shape[axis], dtype=bool)
        for mask in masks:
            present |= mask.any(axis=others)
        index = np.flatnonzero(present)
        if index.size == 0:
            return None
        start = max(int(index[0]) - margin, 0)
        stop = min(int(index[-1]) + 1 + margin, masks[0].shape[axis])
        slices.append(slice(start, stop))
    return tuple(slices)


def edges(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a background face neighbour (outside the array is background)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = mask.copy()
    core = tuple(slice(1, -1) for _ in range(mask.ndim))
    for axis in range(mask.ndim):
        for shift in (0, 2):
            window = list(core)
            window[axis] = slice(shift, shift + mask.shape[axis])
            interior &= padded[tuple(window)]
    return mask & ~interior


def _nearest(points: np.ndarray, targets: np.ndarray) -> np.ndarray:
    if points.shape[0] == 0:
        return np.zeros(0)
    tree = cKDTree(targets, leafsize=KDTREE_LEAF_SIZE, balanced_tree=False, compact_nodes=False)
    distances, _ = tree.query(points, k=1, workers=-1)
    return distances


def _coordinates(flat_indices: np.ndarray, shape: tuple[int, ...], scale: np.ndarray) -> np.ndarray:
    """Physical coordinates (mm) of voxels given by flat index: cheaper than np.argwhere."""
    return np.column_stack(np.unravel_index(flat_indices, shape)).astype(np.float64) * scale


def edge_distances(pred_edges: np.ndarray, ref_edges: np.ndarray,
                   spacing: tuple[float, ...]) -> SurfaceDistances:
    """Directed surface distances both ways; both edge sets must be non-empty."""
    scale = np.asarray(spacing, dtype=np.float64)
    shape = pred_edges.shape
    pred_flat, ref_flat = np.flatnonzero(pred_edges), np.flatnonzero(ref_edges)
    pred_shared = ref_edges.ravel()[pred_flat]  # on both surfaces: distance 0, not queried
    ref_shared = pred_edges.ravel()[ref_flat]
    to_ref = _nearest(_coordinates(pred_flat[~pred_shared], shape, scale),
                      _coordinates(ref_flat, shape, scale))
    to_pred = _nearest(_coordinates(ref_flat[~ref_shared], shape, scale),
                       _coordinates(pred_flat, shape, scale))
    return SurfaceDistances(np.concatenate([np.zeros(int(pred_shared.sum())), to_ref]),
                            np.concatenate([np.zeros(int(ref_shared.sum())), to_pred]))
