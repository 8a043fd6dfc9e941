"""How one request wants its tokens chosen and when it stops (the engine-side mirror of OpenAI's parameters)."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_LOGPROBS = 20  # OpenAI's own cap on top_logprobs


@dataclass
class SamplingParams:
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability sums to at least top_p."""
    top_k: int = -1
    """Keep only the k most likely tokens; -1 (or 0) keeps all."""
    seed: int | None = None
    """Makes sampling reproducible: output index i draws from a generator seeded by (seed, i), whatever the batch."""
    max_tokens: int = 16
    """Most output tokens (forced outputs included)."""
    min_tokens: int = 0
    """Stop strings, stop token ids and EOS are ignored until this many tokens were output."""
    stop: list[str] = field(default_factory=list)
    """Strings that end the output; the returned text stops before the first of them."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end the output (the id is returned, its text is not)."""
    ignore_eos: bool = False
    """Keep generating past the model's EOS tokens."""
    logprobs: int | None = None
    """None: no logprobs; N >= 0: the sampled token's logprob plus the top N alternatives."""
    presence_penalty: float = 0.0
    """OpenAI's: subtracted once from the logit of every token already in the output (-2..2)."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtracted from a token's logit once per time it is already in the output (-2..2)."""
    repetition_penalty: float = 1.0
    """vLLM's (CTRL's): logits of tokens in the prompt or output are divided by it when positive, multiplied when
    negative; 1 is off, > 1 discourages repeats."""
    logit_bias: dict[int, float] = field(default_factory=dict)
    """OpenAI's: token id -> value (-100..100) added to that token's logit before sampling."""
    response_format: str = ""
    """Structured output, as the JSON of ``{"type": "json_object"}`` or ``{"type": "json_schema", "schema": ...}``;
    "" = free text. The engine constrains every sampled token to the grammar and ends the request when it ends."""

    prior_outputs: int = 0
    """A resumed stream (its worker died): the prompt's last N tokens are outputs sent before. The grammar starts
    after them, penalties count them as outputs and seeded draws continue at output index N."""

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        """Raise ValueError naming the bad field and the allowed range; returns self for chaining."""
        if not (self.temperature >= 0.0) or self.temperature > 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or a positive integer, got {self.top_k}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens}")
        if not isinstance(self.min_tokens, int) or not (0 <= self.min_tokens <= self.max_tokens):
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]  # OpenAI accepts a bare string
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or t < 0 or (vocab_size is not None and t >= vocab_size):
                raise ValueError(f"stop_token_ids must be token ids in [0, vocab size), got {t!r}")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        if not isinstance(self.prior_outputs, int) or self.prior_outputs < 0:
            raise ValueError(f"prior_outputs must be an integer >= 0, got {self.prior_outputs!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not 0.0 < self.repetition_penalty <= 100.0:
            raise ValueError(f"repetition_penalty must be in (0, 100], got {self.repetition_penalty}")
        for t, v in self.logit_bias.items():
            if not isinstance(t, int) or t < 0 or (vocab_size is not None and t >= vocab_size):
                raise ValueError(f"logit_bias keys must be token ids in [0, vocab size), got {t!r}")
            if not -100.0 <= v <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {v} for token {t}")
        return self
