"""The same paged-vs-dense equivalence on CUDA (fp32 exact-ish, bf16 within bf16 noise)."""

from __future__ import annotations

import pytest
import torch

from crescent.models.config import AttentionSpec
from tests.unit.models.helpers import check_against_dense, tiny_config, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("attention", ["full", "moba"])
def test_paged_matches_dense_on_cuda_fp32(attention):
    layers = [AttentionSpec(attention, 4, 2), AttentionSpec("full")]
    model = tiny_model(tiny_config(layer_attention=layers)).to("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    check_against_dense(model, block_size=4, lengths=(21, 9, 30), tol=1e-4)


def test_paged_matches_dense_on_cuda_bf16():
    layers = [AttentionSpec("moba", 8, 2), AttentionSpec("full")]
    model = tiny_model(tiny_config(layer_attention=layers)).to("cuda", torch.bfloat16)
    check_against_dense(model, block_size=8, lengths=(21, 9, 30), tol=5e-2)
