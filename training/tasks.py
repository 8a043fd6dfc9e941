"""Arithmetic tasks with exact-match answers: pretraining dialogues and RL prompts share them.

Difficulty is the number of digits of the operands (1 = single digit). A response is correct when the last integer
it contains equals the answer, so "12 + 30 = 42" and "The answer is 42." both score; "42 or 43" does not.

Evaluation problems are held out from *all* training data by construction, not by a list kept per run: every
problem belongs to the train or the eval split by a fixed hash of its operand pair (whatever the operator and the
order), so a pair the evaluation asks about appears in no pretraining dialogue and no RL prompt, in any run.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

SYSTEM_PROMPT = "You are a careful calculator. Answer with the result."
OPERATORS = ("+", "-", "*")
_INT = re.compile(r"-?\d+")
_QUESTION = re.compile(r"^What is (\d+) ([-+*]) (\d+)\?$")
EVAL_FRACTION = 0.1
"""Share of operand pairs in the eval split."""
_SPLIT_KEY = "crescent-arithmetic-split-v1"  # fixed: pretraining, RL and evaluation must agree in every run


@dataclass(frozen=True)
class Problem:
    """One arithmetic question and its exact answer."""

    question: str
    answer: int
    difficulty: int

    @property
    def solution(self) -> str:
        """The reference response the pretraining dialogues teach."""
        return f"{self.question.removeprefix('What is ').removesuffix('?')} = {self.answer}"


def _operand(rng: random.Random, digits: int) -> int:
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def operand_pair(problem: Problem) -> tuple[int, int]:
    """The problem's operands, smaller first (the split ignores operator and order)."""
    m = _QUESTION.match(problem.question)
    if m is None:
        raise ValueError(f"not an arithmetic question: {problem.question!r}")
    a, b = int(m.group(1)), int(m.group(3))
    return (a, b) if a <= b else (b, a)


def in_eval_split(problem: Problem) -> bool:
    lo, hi = operand_pair(problem)
    digest = hashlib.sha256(f"{_SPLIT_KEY}:{lo}:{hi}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < EVAL_FRACTION


def _draw(rng: random.Random, difficulty: int) -> Problem:
    op = rng.choice(OPERATORS)
    a = _operand(rng, difficulty)
    b = _operand(rng, 1 if op == "*" else difficulty)
    answer = a + b if op == "+" else a - b if op == "-" else a * b
    return Problem(question=f"What is {a} {op} {b}?", answer=answer, difficulty=difficulty)


def make_problem(rng: random.Random, difficulty: int, split: str = "train") -> Problem:
    """A random problem of ``split`` ("train": pretraining dialogues and RL prompts; "eval": held out from both);
    multiplication keeps one factor single-digit so answers stay checkable by a tiny model."""
    if difficulty < 1:
        raise ValueError(f"difficulty must be >= 1 (digits per operand), got {difficulty}")
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    while True:
        problem = _draw(rng, difficulty)
        if in_eval_split(problem) == (split == "eval"):
            return problem


def make_problems(seed: int, n: int, difficulty: int, split: str) -> list[Problem]:
    rng = random.Random(f"{seed}:{difficulty}")
    return [make_problem(rng, difficulty, split) for _ in range(n)]


def extract_answer(response: str) -> int | None:
    """The last integer in the response, or None when it has none."""
    found = _INT.findall(response)
    return int(found[-1]) if found else None


def exact_match_reward(response: str, answer: int) -> float:
    return 1.0 if extract_answer(response) == answer else 0.0


def chat_messages(problem: Problem, with_answer: bool) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": problem.question}]
    if with_answer:
        messages.append({"role": "assistant", "content": problem.solution})
    return messages
