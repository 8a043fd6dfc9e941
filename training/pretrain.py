"""Pretraining from scratch: tokenizer + corpus once per run folder, then a resumable training loop.

Run folder layout (``PretrainSettings.out_dir``)::

    tokenizer/            tokenizer.json + tokenizer_config.json (trained once; reused on resume)
    tokens.pt             the encoded train/val token streams (so a resume never re-tokenizes differently)
    checkpoints/step_N.pt weights, optimizer, RNG states, metrics history (see checkpoint.py)

On CPU the model runs its dense, differentiable forward (MoBA layers through the pure-torch reference); with
``attention_backend`` triton (or auto on CUDA) MoBA layers run the Triton kernels and their backward.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

from crescent.models.config import ModelConfig, with_attention
from crescent.training import checkpoint as ckpt
from crescent.training.data import TokenBatcher, build_corpus, encode_documents, validation_batches
from crescent.training.muon import HybridOptimizer
from crescent.training.settings import ModelShapeSettings, PretrainSettings
from crescent.training.tokenizer import IM_END, save_tokenizer, special_id, train_tokenizer


@dataclass
class PretrainResult:
    step: int
    checkpoint: Path
    history: list[dict[str, float]] = field(default_factory=list)
    """One entry per evaluation: step, train_loss, val_loss, tokens_per_s."""


def model_config(shape: ModelShapeSettings, vocab_size: int, max_len: int, eos_id: int) -> ModelConfig:
    base = ModelConfig(vocab_size=vocab_size, hidden_size=shape.hidden_size,
                       intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
                       num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
                       max_position_embeddings=max_len, tie_word_embeddings=True, eos_token_id=eos_id,
                       rope_theta=10000.0)
    return with_attention(base, shape.attention, shape.moba_block_size, shape.moba_topk, shape.full_layers)


def init_weights_(model: torch.nn.Module, seed: int) -> None:
    """GPT-2 style init (N(0, 0.02) matrices, unit norms, zero biases), independent of the model's own defaults."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)


def build_model(config: ModelConfig, seed: int, device: str, attention_backend: str = "torch") -> torch.nn.Module:
    from crescent.models.llama import LlamaForCausalLM  # the model is a sibling package still growing

    model = LlamaForCausalLM(config)
    init_weights_(model, seed)
    if training_attention(attention_backend, device, config) == "triton":
        from crescent.models.attention_triton import TritonAttentionBackend

        model.set_attention_backend(TritonAttentionBackend())
    return model.to(device)


def training_attention(name: str, device: str, config: ModelConfig) -> str:
    """'triton' (exact MoBA kernels + their backward) or 'torch' (the reference: it materializes every score, so
    it is the CPU choice). auto picks triton on CUDA when the kernels take the head size."""
    if name not in ("auto", "torch", "triton"):
        raise ValueError(f"attention_backend={name!r}: use auto, torch or triton")
    d = config.head_dim
    kernel_ok = d >= 16 and d & (d - 1) == 0
    if name == "triton" and not kernel_ok:
        raise ValueError(f"attention_backend='triton' needs head_dim a power of two >= 16, got {d}: use torch")
    if name == "auto":
        return "triton" if device.startswith("cuda") and kernel_ok else "torch"
    return name


def lm_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model.forward_dense(inputs)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


def lr_at(step: int, s: PretrainSettings) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr`` at the last step."""
    if step < s.warmup_steps:
        return s.lr * (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, s.steps - s.warmup_steps)
    return s.lr * (s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def validation_loss(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], device: str) -> float:
    model.eval()
    losses = [lm_loss(model, x.to(device), y.to(device)).item() for x, y in batches]
    model.train()
    return sum(losses) / len(losses)


def prepare_data(s: PretrainSettings) -> tuple[Tokenizer, torch.Tensor, torch.Tensor]:
    """Tokenizer and token streams of the run folder, built on first use (deterministic in ``seed``)."""
    tok_dir, cache = s.out_dir / "tokenizer", s.out_dir / "tokens.pt"
    data_config = {k: getattr(s, k) for k in ("seed", "code_bytes", "n_dialogues", "max_difficulty", "vocab_size")}
    if (tok_dir / "tokenizer.json").exists() and cache.exists():
        streams = torch.load(cache, weights_only=True)
        if streams.get("data_config", data_config) != data_config:
            raise ValueError(f"{s.out_dir} was prepared with {streams['data_config']}, not {data_config}: "
                             "use a new out_dir (or the run's original data settings)")
        return Tokenizer.from_file(str(tok_dir / "tokenizer.json")), streams["train"], streams["val"]
    corpus = build_corpus(s.seed, s.code_bytes, s.n_dialogues, s.max_difficulty)
    tok = train_tokenizer((d.text for d in corpus.train), s.vocab_size)
    save_tokenizer(tok, tok_dir, max_length=s.seq_len * 4)
    train, val = encode_documents(tok, corpus.train), encode_documents(tok, corpus.val)
    torch.save({"train": train, "val": val, "data_config": data_config}, cache)
    return tok, train, val


def pretrain(s: PretrainSettings, on_checkpoint: Any = None) -> PretrainResult:
    """Train (or resume) to ``s.steps`` or ``s.stop_at``; ``on_checkpoint(model, config, step, metrics)`` hooks
    publishing. Returns the last checkpoint and the evaluation history."""
    s.out_dir.mkdir(parents=True, exist_ok=True)
    tok, train_tokens, val_tokens = prepare_data(s)
    config = model_config(s, tok.get_vocab_size(), s.seq_len * 4, special_id(tok, IM_END))
    model = build_model(config, s.seed, s.device, s.attention_backend)
    optimizer = HybridOptimizer(model, s.lr, s.weight_decay, s.optimizer)
    start, history, ema = 0, [], None
    ckpt.seed_everything(s.seed)
    if (last := ckpt.latest_checkpoint(s.out_dir)) is not None:
        state = ckpt.load_checkpoint(last)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        ckpt.set_rng_state(state["rng"])
        start, history, ema = state["step"], state["history"], state["train_loss_ema"]
    batcher = TokenBatcher(train_tokens, s.batch_size, s.seq_len, s.seed)
    val = validation_batches(val_tokens, s.batch_size, s.seq_len, s.eval_batches)
    end = min(s.steps, s.stop_at) if s.stop_at is not None else s.steps
    path = last
    bar = tqdm(range(start, end), initial=start, total=end, disable=not s.progress, desc="pretrain")
    t0, tokens_seen = time.perf_counter(), 0
    for step in bar:
        loss = train_step(model, optimizer, batcher.batch(step), lr_at(step, s), s)
        tokens_seen += s.batch_size * s.seq_len
        ema = loss if ema is None else 0.9 * ema + 0.1 * loss
        tok_s = tokens_seen / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(loss=f"{ema:.3f}", tok_s=f"{tok_s:.0f}")
        done = step + 1
        if done % s.eval_every == 0 or done == end:
            history.append({"step": done, "train_loss": ema, "val_loss": validation_loss(model, val, s.device),
                            "tokens_per_s": tok_s})
            bar.write(f"step {done}: train {ema:.4f} val {history[-1]['val_loss']:.4f} ({tok_s:.0f} tok/s)",
                      file=sys.stderr)
        if done % s.checkpoint_every == 0 or done == end:
            path = ckpt.save_checkpoint(s.out_dir, done, model, optimizer,
                                        {"history": history, "config": config.to_hf(),
                                         "train_loss_ema": ema})
            if on_checkpoint is not None:
                on_checkpoint(model, config, done, history[-1] if history else {})
    if path is None:
        raise ValueError(f"nothing to do: the run in {s.out_dir} is already at step {start} >= {end}")
    return PretrainResult(step=end, checkpoint=path, history=history)


def train_step(model: torch.nn.Module, optimizer: HybridOptimizer, batch: tuple[torch.Tensor, torch.Tensor],
               lr: float, s: PretrainSettings) -> float:
    inputs, targets = (t.to(s.device) for t in batch)
    optimizer.set_lr(lr)
    with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=s.device.startswith("cuda")):
        loss = lm_loss(model, inputs, targets)
    optimizer.zero_grad()
    loss.backward()
    if s.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
    optimizer.step()
    return loss.item()
