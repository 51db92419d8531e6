"""Routing and dispatch kernels behind stable public ops (one folder per kernel)."""

from moejax.kernels.gmm.ops import gmm
from moejax.kernels.gmm.reference import gmm_reference, tgmm_reference
from moejax.kernels.permute.ops import permute, unpermute

__all__ = ["gmm", "gmm_reference", "tgmm_reference", "permute", "unpermute"]
