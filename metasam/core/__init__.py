"""Pure functions of the sharpness optimizer core (one place for the math of docs/algorithms.md §1)."""

from metasam.core.perturbation import (
    ASAM_ETA,
    EPS,
    add,
    agnostic_perturbation,
    asam_scaled,
    check_beta,
    check_nonnegative,
    cosine_similarity,
    dot,
    global_norm,
    momentum_update,
    sam_perturbation,
)

__all__ = [
    "ASAM_ETA",
    "EPS",
    "add",
    "agnostic_perturbation",
    "asam_scaled",
    "check_beta",
    "check_nonnegative",
    "cosine_similarity",
    "dot",
    "global_norm",
    "momentum_update",
    "sam_perturbation",
]
