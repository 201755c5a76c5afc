"""How ΔW relates to the frozen W it is added to (the LoRA paper's §7, Table 7).

For k = r directions on each side, U (out, k) and V (in, k) with orthonormal columns:

    ‖Uᵀ W V‖_F        how much of W lies in the pair of subspaces (the paper writes ‖Uᵀ W Vᵀ‖_F
                      with V as rows)
    from ΔW:          U, V = ΔW's singular vectors (spectrum.delta_svd)
    from W itself:    U, V = W's top-k singular vectors: ‖·‖_F = (σ₁² + … + σ_k²)^½ of W, exactly
    at random:        U, V uniformly random (seeded): E‖Uᵀ W V‖²_F = k² ‖W‖²_F / (out · in), since
                      E[U Uᵀ] = (k/out) I and E[V Vᵀ] = (k/in) I for independent U and V

    amplification = ‖ΔW‖_F / ‖Uᵀ W V‖_F (U, V from ΔW): how much ΔW enlarges the directions it
    touches compared with how much W already had there (the paper: ≈ 21.5 for GPT-3's W_q at r = 4).

W's top-k directions come from a randomized SVD (Halko, Martinsson & Tropp 2011, Algorithms 4.4 and
5.1) with k + OVERSAMPLE Gaussian test vectors and POWER_ITERS subspace iterations, re-orthonormalised
by QR at each step, from a seeded generator: O(out · in · (k + OVERSAMPLE)) work per iteration instead
of a dense SVD's O(out · in · min(out, in)). The norm it captures never exceeds the exact
(σ₁² + … + σ_k²)^½, and falls short of it by a fraction that shrinks geometrically with the
iterations at a rate set by the gap σ_{k+1} / σ_k: below 1e-8 for a decaying spectrum, and under
1% for a Gaussian random matrix, which has no gap at all (the worst case; tests/test_analysis.py
checks both against a dense float64 SVD). When k + OVERSAMPLE ≥ min(out, in) the dense SVD is used
instead (exact).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .spectrum import Spectrum

OVERSAMPLE, POWER_ITERS = 10, 8
RANDOM_SEED = 0       # the random-direction baseline and the randomized SVD's test vectors


def projection_norm(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> float:
    """‖Uᵀ W V‖_F; W (out, in), U (out, k), V (in, k). Costs one (k, in) product, no out × in temporary."""
    return torch.linalg.matrix_norm((U.T @ W) @ V).item()


def top_directions(W: torch.Tensor, k: int, oversample: int = OVERSAMPLE, power_iters: int = POWER_ITERS,
                   seed: int = RANDOM_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """W's top-k singular directions (U (out, k), V (in, k)) by the randomized SVD described above."""
    q = k + oversample
    if q >= min(W.shape):
        U, _, Vh = torch.linalg.svd(W, full_matrices=False)
        return U[:, :k], Vh[:k].T
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(W @ torch.randn(W.shape[1], q, generator=g, dtype=W.dtype)).Q    # (out, q)
    for _ in range(power_iters):
        Z = torch.linalg.qr(W.T @ Q).Q                                                   # (in, q)
        Q = torch.linalg.qr(W @ Z).Q
    U_s, _, Vh = torch.linalg.svd(Q.T @ W, full_matrices=False)                          # (q, in)
    return (Q @ U_s)[:, :k], Vh[:k].T


def random_directions(out_features: int, in_features: int, k: int,
                      seed: int = RANDOM_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniformly random k-dimensional subspaces (U (out, k), V (in, k)): QR of Gaussian matrices."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(out_features, k, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(in_features, k, generator=g, dtype=torch.float64)).Q
    return U, V


@dataclass
class BaseMeasures:
    """Table 7 for one module: ‖W‖_F, ‖ΔW‖_F and ‖Uᵀ W V‖_F for three choices of U, V (k = r)."""
    weight_norm: float          # ‖W‖_F
    delta_norm: float           # ‖ΔW‖_F
    delta_directions: float     # U, V: ΔW's singular vectors
    weight_directions: float    # U, V: W's own top-k
    random_directions: float    # U, V: random (seeded)
    random_expected: float      # (E‖Uᵀ W V‖²_F)^½ = k ‖W‖_F / √(out · in)

    @property
    def relative_norm(self) -> float | None:
        """‖ΔW‖_F / ‖W‖_F (None when W = 0)."""
        return self.delta_norm / self.weight_norm if self.weight_norm > 0 else None

    @property
    def amplification(self) -> float | None:
        """‖ΔW‖_F / ‖Uᵀ W V‖_F with U, V from ΔW (None when W has nothing there)."""
        return self.delta_norm / self.delta_directions if self.delta_directions > 0 else None


def base_measures(W: torch.Tensor, spectrum: Spectrum) -> BaseMeasures:
    """Table 7 for W (out, in) float64 and ΔW's spectrum; k = r (at most min(out, in))."""
    k = min(spectrum.S.numel(), *W.shape)
    weight_norm = torch.linalg.matrix_norm(W).item()
    return BaseMeasures(
        weight_norm=weight_norm,
        delta_norm=spectrum.norm,
        delta_directions=projection_norm(W, spectrum.U, spectrum.V),
        weight_directions=projection_norm(W, *top_directions(W, k)),
        random_directions=projection_norm(W, *random_directions(*W.shape, k)),
        random_expected=k * weight_norm / math.sqrt(W.shape[0] * W.shape[1]),
    )
