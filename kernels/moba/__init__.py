"""MoBA attention: the public entry points (the pure-torch reference; GPU kernels dispatch from here)."""

import importlib

from crescent.kernels.moba.dispatch import (
    moba_attn_prefix_auto,
    moba_attn_varlen_auto,
    moba_decode_paged_auto,
    triton_available,
)
from crescent.kernels.moba.reference import (
    moba_attn_prefix,
    moba_attn_varlen,
    moba_centroids,
    moba_decode_paged,
)

# The Triton entry points load triton on first access only, so CPU-only processes never import it.
_TRITON_EXPORTS = {
    "moba_attn_varlen_triton": "prefill_triton",
    "moba_attn_varlen_qk_triton": "prefill_triton",
    "moba_attn_prefix_triton": "prefill_triton",
    "moba_decode_paged_triton": "decode_triton",
    "MobaCentroidPool": "decode_triton",
    "moba_attn_varlen_trainable": "autograd",
    "MobaVarlenFunction": "autograd",
}


def __getattr__(name: str):
    module = _TRITON_EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = ["moba_attn_prefix", "moba_attn_varlen", "moba_centroids", "moba_decode_paged", "moba_attn_prefix_auto",
           "moba_attn_varlen_auto", "moba_decode_paged_auto", "triton_available", *_TRITON_EXPORTS]
