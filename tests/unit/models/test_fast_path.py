"""prepare_for_inference's fast path (fused projections, input-major few-row copies, RoPE table, batched decode)
computes what the plain model computes, and stays correct when weights are saved, reloaded, moved or trained."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from crescent.models.attention_context import AttentionContext, SeqSlice
from crescent.models.config import AttentionSpec
from crescent.models.llama import LlamaForCausalLM, rope_cos_sin
from crescent.models.loader import load_model, save_model
from tests.unit.models.helpers import check_against_dense, random_tokens, tiny_config, tiny_model
from tests.unit.models.paged import PagedDriver


def prepared(config, seed: int = 0) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """(plain, prepared) copies of the same random model."""
    plain = tiny_model(config, seed)
    fast = tiny_model(config, seed).prepare_for_inference()
    return plain, fast


@pytest.mark.parametrize("variant", [dict(), dict(model_type="qwen2", attention_bias=True, tie_word_embeddings=True)],
                         ids=["llama", "qwen2-bias-tied"])
def test_prepared_model_matches_plain_model_and_its_own_dense_forward(variant):
    plain, fast = prepared(tiny_config(**variant))
    assert fast.model.layers[0].self_attn.fused_qkv is not None
    ids = torch.tensor([random_tokens(19, 5), random_tokens(19, 6)])
    with torch.inference_mode():
        torch.testing.assert_close(fast.forward_dense(ids), plain.forward_dense(ids), atol=1e-5, rtol=1e-5)
    check_against_dense(fast, block_size=4)


@pytest.mark.parametrize("page", [4, 16], ids=["page4", "page16"])
def test_prepared_moba_and_full_layers_match_dense(page):
    cfg = tiny_config(layer_attention=[AttentionSpec("moba", 16, 2), AttentionSpec("full")])
    _, fast = prepared(cfg)
    check_against_dense(fast, block_size=page, lengths=(21, 9, 30))


@pytest.mark.parametrize("n_seqs", [1, 2, 3], ids=["one-row", "two-rows", "three-rows"])
def test_few_row_decode_steps_match_dense(n_seqs):
    """1-2 rows take the input-major copies; 3 rows the row-major weights: all equal the dense logits."""
    _, fast = prepared(tiny_config())
    driver = PagedDriver(fast, block_size=4)
    seqs = {f"s{i}": random_tokens(12 + 3 * i, seed=10 + i) for i in range(n_seqs)}
    driver.step({name: toks[:-2] for name, toks in seqs.items()})
    for back in (2, 1):
        out = driver.step({name: [toks[-back]] for name, toks in seqs.items()})
        for name, toks in seqs.items():
            with torch.inference_mode():
                dense = fast.forward_dense(torch.tensor([toks[: len(toks) - back + 1]]))[0, -1:]
            torch.testing.assert_close(out[name], dense, atol=1e-4, rtol=1e-4)


def test_state_dict_is_unchanged_and_a_prepared_model_saves_and_reloads(tmp_path, default_model_dir):
    plain, fast = prepared(tiny_config(tie_word_embeddings=True))
    a, b = plain.state_dict(), fast.state_dict()
    assert list(a) == list(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    folder = save_model(fast, tmp_path / "m", tokenizer_dir=default_model_dir)
    loaded, _, _ = load_model(folder)
    assert loaded.model.layers[1].mlp.fused_gate_up is not None  # load_model prepares
    ids = torch.tensor([random_tokens(9, 1)])
    with torch.inference_mode():
        torch.testing.assert_close(loaded.forward_dense(ids), plain.forward_dense(ids))


def test_in_place_reload_reaches_the_fused_weights_and_the_few_row_copies():
    """A hot reload copies new weights into the parameters in place: the fast path must use them at once."""
    _, fast = prepared(tiny_config(tie_word_embeddings=True))
    other = tiny_model(tiny_config(tie_word_embeddings=True), seed=7)
    fast.load_state_dict(other.state_dict())
    ids = torch.tensor([random_tokens(11, 2)])
    ctx = AttentionContext(seqs=[SeqSlice(0, 11, 11, [])])
    with torch.inference_mode():
        torch.testing.assert_close(fast.forward_dense(ids), other.forward_dense(ids))
        last = fast(ids[0], torch.arange(11), ctx)[-1:]  # one row: the few-row lm_head copy would be stale
        torch.testing.assert_close(fast.compute_logits(last), other.compute_logits(last))
        one = AttentionContext(seqs=[SeqSlice(0, 1, 1, [])])  # one token: the few-row q/k/v, gate/up copies
        torch.testing.assert_close(fast(ids[0, :1], torch.arange(1), one), other(ids[0, :1], torch.arange(1), one))


def test_moved_or_cast_model_falls_back_then_refuses_again():
    plain, fast = prepared(tiny_config())
    fast.double()
    assert not fast.model.layers[0].self_attn.fused_qkv.intact()
    ids = torch.tensor([random_tokens(10, 3)])
    with torch.inference_mode():
        expect = plain.double().forward_dense(ids)
        torch.testing.assert_close(fast.forward_dense(ids), expect)
        fast.prepare_for_inference()
        assert fast.model.layers[0].self_attn.fused_qkv.intact()
        torch.testing.assert_close(fast.forward_dense(ids), expect)


def test_training_a_prepared_model_still_reaches_every_projection():
    _, fast = prepared(tiny_config())
    ids = torch.tensor([random_tokens(13, 4)])
    logits = fast.forward_dense(ids)
    torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).backward()
    attn = fast.model.layers[0].self_attn
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj, fast.model.layers[0].mlp.up_proj):
        assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_rope_table_grows_past_max_positions_and_rejects_negative_positions():
    cfg = tiny_config(max_position_embeddings=8)
    plain, fast = prepared(cfg)
    ids = torch.tensor(random_tokens(3, 8))
    ctx = AttentionContext(seqs=[SeqSlice(0, 3, 3, [])])
    far = torch.tensor([20, 21, 22])  # positions the table has no rows for yet; uncached, so any start works
    with torch.inference_mode():
        torch.testing.assert_close(fast(ids, far, ctx), plain(ids, far, ctx))
        table = fast._rope.lookup(fast.inv_freq, far, cfg.max_position_embeddings)
        for got, want in zip(table, rope_cos_sin(fast.inv_freq, far), strict=True):
            torch.testing.assert_close(got, want)
        with pytest.raises(ValueError, match="positions must be >= 0"):
            fast(ids, torch.tensor([-1, 0, 1]), ctx)


def test_decode_with_a_block_table_too_short_is_a_clear_error():
    _, fast = prepared(tiny_config())
    driver = PagedDriver(fast, block_size=4)
    driver.step({"s": random_tokens(6, 1)})
    ctx = AttentionContext(seqs=[SeqSlice(0, 1, 7, driver.tables["s"][:1])], slot_mapping=torch.tensor([6]),
                           kv_caches=driver.caches, block_size=4)
    with torch.inference_mode(), pytest.raises(ValueError, match="cannot hold a context of 7"):
        fast(torch.tensor([5]), torch.tensor([6]), ctx)



@pytest.mark.parametrize("rows", [1, 2, 3, 8, 32, 33, 200])
def test_weight_first_products_match_the_plain_ones_and_apply_only_to_decode_sized_fp32_batches(rows):
    from crescent.models import llama

    gen = torch.Generator().manual_seed(rows)
    weight, bias, x = (torch.randn(*shape, generator=gen) for shape in ((96, 40), (96,), (rows, 40)))
    with torch.no_grad():
        out = llama._weight_first(x, weight, bias)
        applies = llama.FEW_ROWS < rows <= llama.MID_ROWS
        assert (out is not None) == applies
        if applies:
            assert out.is_contiguous()
            torch.testing.assert_close(out, F.linear(x, weight, bias), atol=1e-5, rtol=1e-5)
        assert llama._weight_first(x.double(), weight.double(), None) is None
    assert llama._weight_first(x, weight, bias) is None  # autograd on: training keeps nn.Linear
