"""Turns a scheduled batch into one forward pass: flat input ids, positions, paged-cache slots, block tables.

Owns the paged KV cache (per layer ``k_cache``/``v_cache`` [num_blocks, block_size, n_kv_heads, head_dim]) and the
block-level copies used by disaggregation: a block travels as one tensor [num_layers, 2, block_size, n_kv_heads,
head_dim] (all layers' K and V).
"""

from __future__ import annotations

import numpy as np
import torch

from crescent.engine.scheduler import ScheduledBatch
from crescent.models.attention_context import AttentionContext, SeqSlice


def kv_block_bytes(config, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one paged block takes across all layers (K and V)."""
    elem = torch.empty((), dtype=dtype).element_size()
    return config.num_hidden_layers * 2 * block_size * config.num_key_value_heads * config.head_dim * elem


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int):
        self.model = model
        self.config = model.config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks, block_size, self.config.num_key_value_heads, self.config.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device))
                          for _ in range(self.config.num_hidden_layers)]

    def _inputs(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionContext, list[int]]:
        bs = self.block_size
        ids: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        seqs: list[SeqSlice] = []
        sample_rows: list[int] = []
        for item in batch.seqs:
            seq, start, end = item.seq, item.start, item.start + item.num_new
            ids.extend(seq.token_ids[start:end])
            pos = np.arange(start, end, dtype=np.int64)
            table = np.asarray(seq.block_table, dtype=np.int64)
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            flat_start = len(ids) - item.num_new
            seqs.append(SeqSlice(flat_start, len(ids), end, seq.block_table[:-(-end // bs)]))
            if item.samples:
                sample_rows.append(len(ids) - 1)
        dev = self.device
        ctx = AttentionContext(seqs=seqs, slot_mapping=torch.from_numpy(np.concatenate(slots)).to(dev),
                               kv_caches=self.kv_caches, block_size=bs)
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        return input_ids, torch.from_numpy(np.concatenate(positions)).to(dev), ctx, sample_rows

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> torch.Tensor | None:
        """Forward the batch; fp32 logits [num sampling sequences, vocab] in batch order (None if none samples)."""
        input_ids, positions, ctx, sample_rows = self._inputs(batch)
        hidden = self.model.forward(input_ids, positions, ctx)
        if not sample_rows:
            return None
        rows = torch.tensor(sample_rows, dtype=torch.long, device=hidden.device)
        return self.model.compute_logits(hidden.index_select(0, rows)).float()

    # --- block copies for disaggregation ----------------------------------------------------------------------
    def read_block(self, block: int) -> torch.Tensor:
        """[num_layers, 2, block_size, n_kv_heads, head_dim], a contiguous copy."""
        return torch.stack([torch.stack((k[block], v[block])) for k, v in self.kv_caches])

    def check_block(self, data: torch.Tensor) -> None:
        expected = (self.config.num_hidden_layers, 2, self.block_size, self.config.num_key_value_heads,
                    self.config.head_dim)
        if tuple(data.shape) != expected:
            raise ValueError(f"KV block of shape {tuple(data.shape)} does not fit this engine: expected {expected} "
                             "(num_layers, 2, block_size, n_kv_heads, head_dim)")

    def write_block(self, block: int, data: torch.Tensor) -> None:
        self.check_block(data)
        data = data.to(device=self.device, dtype=self.dtype)
        for layer, (k, v) in enumerate(self.kv_caches):
            k[block].copy_(data[layer, 0])
            v[block].copy_(data[layer, 1])
