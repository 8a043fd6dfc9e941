"""One request's token state inside the engine: prompt + outputs, how much of it has KV, and which blocks hold it."""

from __future__ import annotations

import enum
import itertools

from crescent.engine.sampling_params import SamplingParams

_arrival = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """``token_ids`` = prompt + outputs; the KV of ``token_ids[:num_computed]`` is in ``block_table``'s blocks."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 forced_output_ids: list[int] | None = None, hold_kv: bool = False):
        self.request_id = request_id
        self.params = params
        self.prompt_len = len(prompt_token_ids)
        forced = list(forced_output_ids or [])
        self.token_ids: list[int] = list(prompt_token_ids) + forced
        self.num_forced = len(forced)
        self.num_computed = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []
        """Chained hashes of the full blocks of ``token_ids`` computed so far (a pure function of the tokens)."""
        self.num_committed_blocks = 0
        """Leading full blocks already offered to the prefix cache."""
        self.num_cached_tokens = 0
        """Prompt tokens whose KV came from the prefix cache at first admission (reported as cached_tokens)."""
        self.hold_kv = hold_kv
        self.status = SequenceStatus.WAITING
        self.arrival = next(_arrival)
        self.admitted_once = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_outputs(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len:]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, tokens={self.num_tokens}, computed={self.num_computed}, "
                f"blocks={len(self.block_table)}, {self.status.value})")
