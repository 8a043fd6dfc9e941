"""Offline corpus, tokenizer, deterministic split and batches."""

from __future__ import annotations

import torch

from crescent.training.data import TokenBatcher, build_corpus, encode_documents, validation_batches
from crescent.training.tokenizer import (
    CHAT_TEMPLATE,
    IM_END,
    IM_START,
    render_chat,
    special_id,
    train_tokenizer,
)


def test_corpus_is_deterministic_and_split_by_document():
    a = build_corpus(seed=3, code_bytes=50_000, n_dialogues=200)
    b = build_corpus(seed=3, code_bytes=50_000, n_dialogues=200)
    assert [d.name for d in a.train] == [d.name for d in b.train] and a.val and a.train
    assert not {d.name for d in a.train} & {d.name for d in a.val}
    kinds = {d.name.split(":")[0] for d in a.train}
    assert kinds == {"py", "doc", "chat"}
    c = build_corpus(seed=4, code_bytes=50_000, n_dialogues=200)
    assert [d.name for d in c.train] != [d.name for d in a.train]


def test_tokenizer_round_trips_and_splits_digits():
    corpus = build_corpus(seed=0, code_bytes=40_000, n_dialogues=100)
    tok = train_tokenizer((d.text for d in corpus.train), vocab_size=512)
    assert tok.get_vocab_size() == 512
    text = "def add(a, b):\n    return a + b  # 1234 ünïcode"
    assert tok.decode(tok.encode(text).ids) == text
    assert [t for t in tok.encode("x = 1234").tokens if t.isdigit()] == ["1", "2", "3", "4"]
    chat = render_chat([{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True)
    assert chat == f"{IM_START}user\nWhat is 2 + 2?{IM_END}\n{IM_START}assistant\n"
    ids = tok.encode(chat).ids
    assert ids[0] == special_id(tok, IM_START) and special_id(tok, IM_END) in ids
    assert "add_generation_prompt" in CHAT_TEMPLATE


def test_batches_depend_only_on_seed_and_step():
    tokens = torch.arange(1000, dtype=torch.int32)
    batcher = TokenBatcher(tokens, batch_size=4, seq_len=16, seed=1)
    x, y = batcher.batch(5)
    assert x.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(TokenBatcher(tokens, 4, 16, seed=1).batch(5)[0], x)
    assert not torch.equal(batcher.batch(6)[0], x)
    val = validation_batches(tokens, batch_size=4, seq_len=16, max_batches=2)
    assert len(val) == 2 and torch.equal(val[0][0][0], tokens[:16].long())


def test_encode_documents_separates_with_eos():
    corpus = build_corpus(seed=0, code_bytes=20_000, n_dialogues=20)
    tok = train_tokenizer((d.text for d in corpus.train), vocab_size=300)
    stream = encode_documents(tok, corpus.val)
    assert (stream == special_id(tok, "<|endoftext|>")).sum().item() == len(corpus.val)


def test_evaluation_operand_pairs_appear_in_no_training_data():
    """The RL evaluation is held out from all training data by operand pair: no pretraining dialogue and no RL prompt
    uses a pair (in either order, with any operator) that the evaluation asks about."""
    import random

    from crescent.training.data import arithmetic_dialogues
    from crescent.training.rl import train_problems
    from crescent.training.tasks import make_problems, operand_pair

    eval_pairs = {operand_pair(p) for d in (1, 2) for p in make_problems(11, 300, d, "eval")}
    dialogues = arithmetic_dialogues(3000, seed=0, max_difficulty=2)
    rl = [p for d in (1, 2) for p in train_problems(random.Random(5), 1000, d)]
    assert len(eval_pairs) > 100 and len(dialogues) == 3000
    questions = [d.text for d in dialogues]
    for lo, hi in eval_pairs:
        for a, b in ((lo, hi), (hi, lo)):
            assert not any(f"What is {a} {op} {b}?" in q for q in questions for op in "+-*"), (a, b)
    assert not eval_pairs & {operand_pair(p) for p in rl}
