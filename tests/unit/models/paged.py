"""A minimal paged-cache driver for model tests: allocates blocks, builds AttentionContexts, runs forward."""

from __future__ import annotations

import torch

from crescent.models.attention_context import AttentionContext, SeqSlice
from crescent.models.llama import LlamaForCausalLM


class PagedDriver:
    def __init__(self, model: LlamaForCausalLM, num_blocks: int = 64, block_size: int = 4) -> None:
        cfg = model.config
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        weight = model.lm_head.weight
        self.device = weight.device
        # NaN-poisoned: a read of any slot that was never written shows up in the logits.
        self.caches = [tuple(torch.full(shape, float("nan"), dtype=weight.dtype, device=self.device)
                             for _ in range(2)) for _ in range(cfg.num_layers)]
        self.model, self.block_size = model, block_size
        self.free = list(range(num_blocks - 1, -1, -1))
        self.tables: dict[str, list[int]] = {}
        self.lens: dict[str, int] = {}

    def step(self, new_tokens: dict[str, list[int]]) -> dict[str, torch.Tensor]:
        """Append tokens to sequences (new names start empty) in one varlen forward; -> logits per sequence."""
        ids, positions, slots, seqs = [], [], [], []
        for name, toks in new_tokens.items():
            start_len = self.lens.get(name, 0)
            table = self.tables.setdefault(name, [])
            while len(table) * self.block_size < start_len + len(toks):
                table.append(self.free.pop())
            for p in range(start_len, start_len + len(toks)):
                slots.append(table[p // self.block_size] * self.block_size + p % self.block_size)
                positions.append(p)
            seqs.append(SeqSlice(len(ids), len(ids) + len(toks), start_len + len(toks), list(table)))
            ids.extend(toks)
            self.lens[name] = start_len + len(toks)
        ctx = AttentionContext(seqs=seqs, slot_mapping=torch.tensor(slots, device=self.device),
                               kv_caches=self.caches, block_size=self.block_size)
        with torch.inference_mode():
            hidden = self.model(torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device),
                                ctx)
            logits = self.model.compute_logits(hidden)
        return {name: logits[s.start : s.end] for name, s in zip(new_tokens, seqs, strict=True)}

