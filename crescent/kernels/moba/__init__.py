"""MoBA attention: the public entry points (the pure-torch reference; GPU kernels dispatch from here)."""

from crescent.kernels.moba.reference import (
    moba_attn_prefix,
    moba_attn_varlen,
    moba_centroids,
    moba_decode_paged,
)

__all__ = ["moba_attn_prefix", "moba_attn_varlen", "moba_centroids", "moba_decode_paged"]
