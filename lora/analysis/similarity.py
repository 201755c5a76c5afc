"""Normalised subspace similarity between two adapters' factors (the LoRA paper's §7, Figure 3):

    φ(A₁, A₂, i, j) = ‖U_{A₁}^{(i)ᵀ} U_{A₂}^{(j)}‖²_F / min(i, j)   ∈ [0, 1],   i ≤ r₁, j ≤ r₂

U_A^{(i)}: the top-i right singular vectors of A (r, in), i.e. A's row space, best directions first;
for B (out, r) the same with its left singular vectors (its column space). φ = 1 when one top
subspace contains the other, 0 when they are orthogonal. Two random subspaces of R^n give
E φ(i, j) = max(i, j) / n: a fixed i-dimensional U and a uniformly random j-dimensional one have
E[U_j U_jᵀ] = (j/n) I, so E‖U_iᵀ U_j‖²_F = i j / n.
"""
from __future__ import annotations

import torch


def row_space(lora_A: torch.Tensor) -> torch.Tensor:
    """A's right singular vectors (in, r), by descending singular value of A."""
    return torch.linalg.svd(lora_A.double(), full_matrices=False).Vh.T


def column_space(lora_B: torch.Tensor) -> torch.Tensor:
    """B's left singular vectors (out, r), by descending singular value of B."""
    return torch.linalg.svd(lora_B.double(), full_matrices=False).U


def subspace_similarity(U1: torch.Tensor, U2: torch.Tensor) -> torch.Tensor:
    """φ(i, j) for every i ≤ r₁, j ≤ r₂ as an (r₁, r₂) matrix; U1 (n, r₁), U2 (n, r₂) orthonormal columns.

    ‖U1[:, :i]ᵀ U2[:, :j]‖²_F is the (i, j) prefix sum of the squared overlaps (U1ᵀ U2)².
    """
    prefix = (U1.T @ U2).square().cumsum(0).cumsum(1)                     # (r1, r2)
    i, j = _ranks(U1.shape[1], U2.shape[1])
    return prefix / torch.minimum(i, j)


def adapter_similarity(A1: torch.Tensor, B1: torch.Tensor,
                       A2: torch.Tensor, B2: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"A": φ over the lora_A row spaces, "B": φ over the lora_B column spaces} of one module."""
    return {"A": subspace_similarity(row_space(A1), row_space(A2)),
            "B": subspace_similarity(column_space(B1), column_space(B2))}


def random_similarity(r1: int, r2: int, n: int) -> torch.Tensor:
    """E φ(i, j) = max(i, j) / n for random subspaces of R^n: the noise floor to read φ against."""
    i, j = _ranks(r1, r2)
    return torch.maximum(i, j) / n


def _ranks(r1: int, r2: int) -> tuple[torch.Tensor, torch.Tensor]:
    """i (r1, 1) and j (1, r2), from 1, in float64: they broadcast to the (r1, r2) grid of φ."""
    return (torch.arange(1, r1 + 1, dtype=torch.float64)[:, None],
            torch.arange(1, r2 + 1, dtype=torch.float64)[None, :])
