"""Force encoding (Eq. 5) and the σ-encoding ablation (Table 1e idx 5).

Both are DeNS-only modules (:class:`fairchem_dens.dens_only.DeNSOnly`) and have no bias: a zero
input gives an exactly zero embedding, so uncorrupted atoms, original-task structures and
evaluation structures see exactly the parent model.
"""

from __future__ import annotations

import torch
from e3nn import o3
from torch import nn

from fairchem_dens.dens_only import DeNSOnly


class ForceEncoding(DeNSOnly, nn.Module):
    """x_f^(L) = SO3_Linear^(L)(‖f‖ · Y^(L)(f / ‖f‖)) for 0 ≤ L ≤ Lmax (Eq. 5).

    With one input channel, the SO(3) linear layer of degree L is one weight per (L, channel),
    shared by the 2L+1 orders of that degree, which keeps the map equivariant.

    Args:
        lmax: maximum degree Lmax of the node embeddings.
        channels: number of channels C of the node embeddings.
    """

    def __init__(self, lmax: int, channels: int) -> None:
        super().__init__()
        self.lmax = lmax
        self.channels = channels
        self.weight = nn.Parameter(torch.empty(lmax + 1, channels))
        nn.init.uniform_(self.weight, -1.0, 1.0)  # fan-in 1, as SO3_LinearV2 initialises
        degree_of_coefficient = torch.cat(
            [torch.full((2 * degree + 1,), degree, dtype=torch.long) for degree in range(lmax + 1)]
        )
        self.register_buffer("expand_index", degree_of_coefficient, persistent=False)

    def forward(self, forces: torch.Tensor) -> torch.Tensor:
        """Encode per-atom forces.

        Args:
            forces: (n_atoms, 3) normalised forces f/σ_F (0 for atoms that encode nothing).

        Returns:
            (n_atoms, (Lmax+1)², C) embedding in e3nn's real spherical-harmonic layout, the layout
            of EquiformerV2's and eSCN's ``SO3_Embedding``; exactly 0 where f = 0.
        """
        norm = forces.norm(dim=-1, keepdim=True)  # ‖f‖, (n, 1)
        # Y^(L)(f/‖f‖), component normalisation; f = 0 gives finite values that ‖f‖ zeroes
        harmonics = o3.spherical_harmonics(
            list(range(self.lmax + 1)), forces, normalize=True, normalization="component"
        )
        scaled = torch.where(norm > 0, harmonics * norm, torch.zeros_like(harmonics))
        # Eq. 5: SO3_Linear^(L) — one weight per degree L and output channel, no bias
        return scaled.unsqueeze(-1) * self.weight[self.expand_index].unsqueeze(0)


class SigmaEncoding(DeNSOnly, nn.Module):
    """Encodes the structure's σ into the degree-0 channels (ablation, Table 1e idx 5).

    Args:
        channels: number of channels C of the node embeddings.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(1, channels, bias=False)

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        """(n_atoms,) σ in Å (0 for original-task atoms) -> (n_atoms, C), exactly 0 where σ = 0."""
        return self.linear(sigma.unsqueeze(-1))
