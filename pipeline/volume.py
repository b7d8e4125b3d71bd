"""The one value every step passes around: a CT volume in HU with its LPS geometry.

Array layout follows SimpleITK's ``GetArrayFromImage``: ``hu[k, j, i]`` with ``i`` the
column (fastest), ``j`` the row and ``k`` the slice. Geometry follows DICOM/ITK:
``lps = origin_lps_mm + direction @ (spacing_mm * [i, j, k])``, with the columns of
``direction`` the unit LPS directions of the i, j and k axes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Volume:
    """A CT volume in Hounsfield units and its patient (LPS) geometry.

    Parameters
    ----------
    hu : ndarray, shape (nk, nj, ni), float32
        Voxel values in HU, indexed ``[k, j, i]``.
    origin_lps_mm : ndarray, shape (3,)
        LPS position of the centre of voxel ``(i, j, k) = (0, 0, 0)`` in mm.
    spacing_mm : ndarray, shape (3,)
        Voxel size along i, j, k in mm.
    direction : ndarray, shape (3, 3)
        Unit LPS direction of the i, j, k axes as columns.
    meta : dict
        Non-identifying facts about the source (series UID, kernel, why it was chosen).
    """

    hu: np.ndarray
    origin_lps_mm: np.ndarray
    spacing_mm: np.ndarray
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "origin_lps_mm", np.asarray(self.origin_lps_mm, float).reshape(3))
        object.__setattr__(self, "spacing_mm", np.asarray(self.spacing_mm, float).reshape(3))
        object.__setattr__(self, "direction", np.asarray(self.direction, float).reshape(3, 3))
        if self.hu.ndim != 3:
            raise ValueError(f"volume must be 3-D, got shape {self.hu.shape}")
        if not np.all(self.spacing_mm > 0):
            raise ValueError(f"spacing must be positive, got {self.spacing_mm}")

    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        """Size along i, j, k (the reverse of ``hu.shape``)."""
        nk, nj, ni = self.hu.shape
        return (ni, nj, nk)

    @property
    def index_to_lps_matrix(self) -> np.ndarray:
        """3x3 matrix M with ``lps = origin + M @ ijk``."""
        return self.direction * self.spacing_mm[None, :]

    def ijk_to_lps(self, ijk) -> np.ndarray:
        """Continuous (i, j, k) indices, shape (..., 3), to LPS mm."""
        ijk = np.asarray(ijk, float)
        return ijk @ self.index_to_lps_matrix.T + self.origin_lps_mm

    def lps_to_ijk(self, lps) -> np.ndarray:
        """LPS mm, shape (..., 3), to continuous (i, j, k) indices."""
        lps = np.asarray(lps, float)
        return (lps - self.origin_lps_mm) @ np.linalg.inv(self.index_to_lps_matrix).T

    def lps_to_kji(self, lps) -> np.ndarray:
        """LPS mm to continuous array coordinates ``(k, j, i)`` for ``hu[k, j, i]``."""
        return self.lps_to_ijk(lps)[..., ::-1]

    def kji_to_lps(self, kji) -> np.ndarray:
        """Array coordinates ``(k, j, i)`` to LPS mm."""
        return self.ijk_to_lps(np.asarray(kji, float)[..., ::-1])

    def direction_lps_to_kji(self, vec_lps) -> np.ndarray:
        """An LPS displacement in mm, shape (..., 3), to a displacement in (k, j, i) voxels."""
        vec = np.asarray(vec_lps, float)
        return (vec @ np.linalg.inv(self.index_to_lps_matrix).T)[..., ::-1]

    def voxel_grid_lps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Dense LPS coordinates (x, y, z), each shaped like ``hu``; for phantoms and tests."""
        nk, nj, ni = self.hu.shape
        k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
        m = self.index_to_lps_matrix
        x = self.origin_lps_mm[0] + m[0, 0] * i + m[0, 1] * j + m[0, 2] * k
        y = self.origin_lps_mm[1] + m[1, 0] * i + m[1, 1] * j + m[1, 2] * k
        z = self.origin_lps_mm[2] + m[2, 0] * i + m[2, 1] * j + m[2, 2] * k
        return x, y, z
