"""Routing and dispatch kernels behind stable public ops (one folder per kernel)."""

from moejax.kernels.gmm.looped import grouped_swiglu
from moejax.kernels.gmm.ops import (
    IMPLS,
    default_impl,
    gmm,
    target_platform,
    targets_accelerator,
    tgmm,
)
from moejax.kernels.gmm.reference import gmm_reference, tgmm_reference
from moejax.kernels.permute.ops import gather_rows, inverse, permute, permute_rows, unpermute

__all__ = [
    "IMPLS",
    "targets_accelerator",
    "default_impl",
    "target_platform",
    "gmm",
    "tgmm",
    "grouped_swiglu",
    "gmm_reference",
    "tgmm_reference",
    "gather_rows",
    "inverse",
    "permute",
    "permute_rows",
    "unpermute",
]
