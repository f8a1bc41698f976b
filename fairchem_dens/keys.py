"""Names of the batch fields that join the DeNS stages (one constant per field).

The denoising dataset (:mod:`fairchem_dens.datasets`) writes these fields on every *training*
structure while DeNS is active; the force-encoding backbones read only
:data:`DENS_FORCE_INPUT` (and :data:`DENS_SIGMA` for the σ-encoding ablation); the trainer reads the
rest. Validation, test, predict and relaxation data carry none of them, and then models and trainer
behave exactly as their fairchem parents.

Shapes are given for a collated batch of ``n_structures`` structures with ``n_atoms`` atoms in all;
a single structure carries per-structure fields with shape ``(1,)``.
"""

from __future__ import annotations

#: (n_structures,) bool — this structure optimises DeNS (Alg. 1 l.8), i.e. at least one atom was
#: corrupted; False: the original task (Eq. 1).
DENS_STRUCTURE = "dens_structure"

#: (n_atoms,) bool — m_i: the atom is corrupted and denoised (Alg. 1 l.16-22).
DENS_MASK = "dens_mask"

#: (n_structures,) float32, Å — σ drawn for the structure (Alg. 1 l.10/12); 0 if original task.
DENS_SIGMA = "dens_sigma"

#: (n_atoms, 3) float32, dimensionless — ε_i / σ' on corrupted atoms, 0 elsewhere (Eq. 4 target;
#: σ' = σ, or σ_high under multi-scale noise with ``optim.dens.target_scale: sigma_high``).
DENS_TARGET = "dens_target"

#: (n_atoms, 3) float32, dimensionless — normalised forces f_i / σ_F on corrupted atoms, 0 elsewhere
#: (Alg. 1 l.24), the input of the force encoding (Eq. 5).
DENS_FORCE_INPUT = "dens_force_input"

#: (n_structures,) int64 — why a structure is or is not a DeNS structure (see ``noise.Status``).
DENS_STATUS = "dens_status"

#: All fields the denoising dataset adds to a training structure.
ALL_FIELDS = (
    DENS_STRUCTURE,
    DENS_MASK,
    DENS_SIGMA,
    DENS_TARGET,
    DENS_FORCE_INPUT,
    DENS_STATUS,
)

#: Model output key of the noise head: (n_atoms, 3) float, the prediction ε̂ of ε / σ (Eq. 4).
NOISE_OUTPUT = "dens_noise"
