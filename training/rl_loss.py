"""The Kimi k1.5 policy-optimization math (arXiv 2501.12599, section 2.3), as small pure functions.

Per prompt x with k sampled responses y_1..y_k, rewards r_j and mean reward r_bar, the k1.5 gradient is

    (1/k) sum_j [ grad log pi(y_j|x) (r_j - r_bar) - (tau/2) grad (log pi(y_j|x) / pi_old(y_j|x))^2 ]

where pi_old is the policy that sampled the batch (the reference is reset to the current policy every iteration).
We ascend it by minimizing its negation, :func:`k15_loss`. Sequence log-probabilities are sums over the response
tokens (the stop token included, so the policy also learns when to stop).

Length penalty (section 2.3.3): among one prompt's k responses with lengths in [min, max],
lambda_i = 0.5 - (len_i - min) / (max - min); a correct response gets lambda_i, a wrong one min(0, lambda_i)
(short wrong answers are not rewarded). When all k responses have the same length, every lambda is 0.
"""

from __future__ import annotations

import torch


def length_rewards(lengths: list[int], correct: list[bool]) -> list[float]:
    if len(lengths) != len(correct):
        raise ValueError(f"{len(lengths)} lengths but {len(correct)} correctness flags")
    if not lengths:
        return []
    shortest, longest = min(lengths), max(lengths)
    if longest == shortest:
        return [0.0] * len(lengths)
    lambdas = [0.5 - (n - shortest) / (longest - shortest) for n in lengths]
    return [lam if ok else min(0.0, lam) for lam, ok in zip(lambdas, correct, strict=True)]


def k15_loss(logp: torch.Tensor, logp_old: torch.Tensor, rewards: torch.Tensor, tau: float) -> torch.Tensor:
    """Negated k1.5 surrogate for one prompt's k responses (each argument shaped [k]); differentiable in ``logp``.

    The baseline is the mean reward of the k responses; it and ``logp_old`` carry no gradient.
    """
    if not (logp.shape == logp_old.shape == rewards.shape) or logp.ndim != 1:
        raise ValueError(f"logp {tuple(logp.shape)}, logp_old {tuple(logp_old.shape)} and rewards "
                         f"{tuple(rewards.shape)} must all be [k]")
    advantage = (rewards - rewards.mean()).detach()
    log_ratio = logp - logp_old.detach()
    return -(logp * advantage - 0.5 * tau * log_ratio.pow(2)).mean()


def keep_prompt(rewards: list[float]) -> bool:
    """k1.5's prompt filter: keep only prompts the policy sometimes, but not always, solves (0 < pass rate < 1)."""
    pass_rate = sum(1 for r in rewards if r > 0) / max(len(rewards), 1)
    return 0.0 < pass_rate < 1.0


class Curriculum:
    """Difficulty (digits per operand) that moves up once the recent mean pass rate exceeds ``promote_at``."""

    def __init__(self, start: int, stop: int, promote_at: float, window: int = 2) -> None:
        if not 1 <= start <= stop:
            raise ValueError(f"curriculum needs 1 <= start ({start}) <= stop ({stop})")
        self.difficulty, self.stop, self.promote_at, self.window = start, stop, promote_at, window
        self._recent: list[float] = []

    def update(self, pass_rate: float) -> int:
        self._recent = (self._recent + [pass_rate])[-self.window:]
        if (len(self._recent) == self.window and min(self._recent) > self.promote_at
                and self.difficulty < self.stop):
            self.difficulty += 1
            self._recent = []
        return self.difficulty
