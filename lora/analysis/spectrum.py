"""ΔW = scaling · B A from its factors: an SVD, its norm, stable rank and effective rank.

    B  = Q_B R_B        (out, r) = (out, r) (r, r)        thin QR
    Aᵀ = Q_A R_A        (in, r)  = (in, r)  (r, r)
    ΔW = scaling · Q_B (R_B R_Aᵀ) Q_Aᵀ;   core = scaling · R_B R_Aᵀ = U_c Σ V_cᵀ      (r, r)
    ΔW = (Q_B U_c) Σ (Q_A V_c)ᵀ                                                     an SVD of ΔW

O((out + in) r²) work and memory: the out × in matrix is never formed. All in float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Spectrum:
    """ΔW = U diag(S) Vᵀ. S has length r, descending; past min(out, in, r) its values are 0."""
    U: torch.Tensor       # (out, k) orthonormal columns, k = min(out, in, r)
    S: torch.Tensor       # (r,)
    V: torch.Tensor       # (in, k)

    @property
    def norm(self) -> float:
        """‖ΔW‖_F = ‖S‖₂."""
        return torch.linalg.vector_norm(self.S).item()


def delta_svd(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> Spectrum:
    """The SVD of scaling · lora_B @ lora_A (A: (r, in), B: (out, r)) from thin QRs of B and Aᵀ."""
    r = lora_A.shape[0]
    Q_B, R_B = torch.linalg.qr(lora_B.double())              # (out, kB), (kB, r)
    Q_A, R_A = torch.linalg.qr(lora_A.double().T)            # (in, kA),  (kA, r)
    core = scaling * (R_B @ R_A.T)                            # (kB, kA)
    U_c, S, Vh_c = torch.linalg.svd(core, full_matrices=False)
    S = torch.cat([S, S.new_zeros(r - S.numel())])           # rank ≤ min(out, in) < r: zeros
    return Spectrum(Q_B @ U_c, S, Q_A @ Vh_c.T)


def stable_rank(S: torch.Tensor) -> float:
    """‖ΔW‖²_F / σ₁² (between 1 and the rank); 0 for ΔW = 0."""
    top = S.max().item() if S.numel() else 0.0
    return (S.square().sum().item() / top ** 2) if top > 0 else 0.0


def effective_rank(S: torch.Tensor) -> float:
    """exp(H(p)), p = σ / Σσ, H the Shannon entropy with 0 log 0 = 0 (Roy & Vetterli 2007): r for a
    flat spectrum, 1 for rank one; 0 for ΔW = 0."""
    total = S.sum().item()
    if total <= 0:
        return 0.0
    p = S[S > 0] / total
    return math.exp(-(p * p.log()).sum().item())
