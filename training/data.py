"""Pretraining data available offline on every machine, split and batched deterministically.

Sources: the Python standard library's own ``.py`` sources (code), the docstrings of those modules (English prose),
and generated arithmetic dialogues in the chat format (so the model learns the template and the task RL tunes).
The validation split is held out by document (a seeded hash of its name), so no window of a validation file was
ever trained on. Batches are a pure function of ``(seed, step)``: resuming at step N needs only N.
"""

from __future__ import annotations

import ast
import hashlib
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from crescent.training.tasks import chat_messages, make_problem
from crescent.training.tokenizer import EOS, render_chat, special_id

_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3", "ensurepip"}


@dataclass(frozen=True)
class Document:
    name: str
    text: str


@dataclass
class Corpus:
    train: list[Document]
    val: list[Document]


def stdlib_sources(max_bytes: int, seed: int) -> list[Document]:
    """Up to ``max_bytes`` of stdlib ``.py`` files, a seeded sample of the sorted list (same on a given Python)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS & set(p.relative_to(root).parts[:-1]))
    if not files:
        raise FileNotFoundError(f"no Python sources under {root}: the stdlib is needed as training text")
    random.Random(seed).shuffle(files)
    docs, total = [], 0
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few stdlib test fixtures are deliberately not UTF-8
        if total + len(text) > max_bytes:
            continue
        docs.append(Document(f"py:{path.relative_to(root)}", text))
        total += len(text)
    return docs


def docstrings_of(doc: Document) -> Document | None:
    """The module's docstrings as one prose document (None when it has none or does not parse)."""
    try:
        tree = ast.parse(doc.text)
    except SyntaxError:
        return None
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef)]
    parts = [d for n in nodes if (d := ast.get_docstring(n))]
    return Document(doc.name.replace("py:", "doc:", 1), "\n\n".join(parts)) if parts else None


def arithmetic_dialogues(n: int, seed: int, max_difficulty: int) -> list[Document]:
    rng = random.Random(f"dialogues:{seed}")
    docs = []
    for i in range(n):
        problem = make_problem(rng, rng.randint(1, max_difficulty))
        docs.append(Document(f"chat:{i}", render_chat(chat_messages(problem, with_answer=True))))
    return docs


def _in_val(name: str, seed: int, val_fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < val_fraction


def build_corpus(seed: int = 0, code_bytes: int = 4_000_000, n_dialogues: int = 20_000,
                 max_difficulty: int = 2, val_fraction: float = 0.05) -> Corpus:
    """Code + docstrings + dialogues, split into train/val by document."""
    code = stdlib_sources(code_bytes, seed)
    prose = [d for d in map(docstrings_of, code) if d is not None]
    docs = code + prose + arithmetic_dialogues(n_dialogues, seed, max_difficulty)
    corpus = Corpus(train=[], val=[])
    for doc in docs:
        (corpus.val if _in_val(doc.name, seed, val_fraction) else corpus.train).append(doc)
    random.Random(seed).shuffle(corpus.train)
    random.Random(seed + 1).shuffle(corpus.val)  # validation windows come from the front: mix the sources
    return corpus


def encode_documents(tok: Tokenizer, docs: list[Document]) -> torch.Tensor:
    """All documents as one int32 token stream, each followed by the end-of-text token."""
    eos = special_id(tok, EOS)
    ids: list[int] = []
    for enc in tok.encode_batch([d.text for d in docs]):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


class TokenBatcher:
    """Random windows of ``seq_len + 1`` tokens; the batch for step s depends only on (seed, s)."""

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int) -> None:
        if tokens.numel() <= seq_len + 1:
            raise ValueError(f"token stream of {tokens.numel()} tokens is too short for seq_len={seq_len}")
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, self.tokens.numel() - self.seq_len - 1, (self.batch_size,), generator=gen)
        windows = torch.stack([self.tokens[s:s + self.seq_len + 1] for s in starts.tolist()]).long()
        return windows[:, :-1], windows[:, 1:]


def validation_batches(tokens: torch.Tensor, batch_size: int, seq_len: int,
                       max_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed, non-overlapping windows from the start of the validation stream."""
    n_windows = min((tokens.numel() - 1) // seq_len, batch_size * max_batches)
    if n_windows < 1:
        raise ValueError(f"validation stream of {tokens.numel()} tokens is shorter than seq_len={seq_len}")
    out = []
    for first in range(0, n_windows, batch_size):
        rows = [tokens[i * seq_len:i * seq_len + seq_len + 1] for i in range(first, min(first + batch_size, n_windows))]
        windows = torch.stack(rows).long()
        out.append((windows[:, :-1], windows[:, 1:]))
    return out
