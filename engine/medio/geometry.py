"""Do two images sit on the same voxel grid? Compared with tolerances, each difference named."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.medio.volume import Geometry


@dataclass(frozen=True)
class GeometryTolerance:
    spacing_mm: float = 1e-3  # per axis
    origin_mm: float = 1e-2
    direction: float = 1e-4  # per direction-cosine component


def geometry_differences(candidate: Geometry, reference: Geometry,
                         tolerance: GeometryTolerance = GeometryTolerance()) -> list[str]:
    """Every way `candidate` differs from `reference`, in words; empty when they match."""
    if tuple(candidate.shape) != tuple(reference.shape):
        return [f"shape is {list(candidate.shape)}, expected {list(reference.shape)}"]
    problems = []
    spacing, ref_spacing = np.array(candidate.spacing), np.array(reference.spacing)
    if not np.allclose(spacing, ref_spacing, atol=tolerance.spacing_mm, rtol=0):
        problems.append(f"voxel spacing is {_mm(spacing)}, expected {_mm(ref_spacing)}")
    directions = candidate.affine[:3, :3] / spacing[None, :]
    ref_directions = reference.affine[:3, :3] / ref_spacing[None, :]
    if not np.allclose(directions, ref_directions, atol=tolerance.direction, rtol=0):
        problems.append(f"orientation is {candidate.orientation}, expected "
                        f"{reference.orientation} (direction cosines differ)")
    origin, ref_origin = np.array(candidate.origin), np.array(reference.origin)
    if not np.allclose(origin, ref_origin, atol=tolerance.origin_mm, rtol=0):
        problems.append(f"origin is {_mm(origin)}, expected {_mm(ref_origin)}")
    return problems


def _mm(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ") mm"
