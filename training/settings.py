"""Typed settings of the training sidecar (pretraining and RL), mapped onto ``crescent train`` flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from crescent.settings import CrescentSettings, default_model_cache


class ModelShapeSettings(CrescentSettings):
    """The transformer trained from scratch (a small Llama with per-layer full or MoBA attention)."""

    hidden_size: int = Field(256, description="Model width.")
    intermediate_size: int = Field(704, description="SwiGLU hidden width.")
    num_layers: int = Field(4, description="Decoder layers.")
    num_heads: int = Field(4, description="Query heads.")
    num_kv_heads: int = Field(2, description="Key/value heads (GQA).")
    attention: Literal["full", "moba"] = Field("moba", description="Attention of the layers not in full_layers.")
    moba_block_size: int = Field(32, description="MoBA key block size in tokens.")
    moba_topk: int = Field(2, description="MoBA blocks per query, counting its own block.")
    full_layers: list[int] = Field([0], description="Layers that keep full attention (JSON list).")
    vocab_size: int = Field(4096, description="Byte-level BPE vocabulary size.")


class PretrainSettings(ModelShapeSettings):
    """Pretraining from scratch on offline text + arithmetic dialogues."""

    out_dir: Path = Field(Path("runs/pretrain"), description="Run folder: tokenizer, token cache, checkpoints.")
    model_dir: Path | None = Field(None, description="Publish checkpoints to <model_dir>/<model_name>/v<step>.")
    model_name: str = Field("crescent-tiny", description="Name of the published model.")
    seed: int = Field(0, description="Seeds init, data split and batch order.")
    steps: int = Field(600, description="Total optimizer steps (the LR schedule spans these).")
    stop_at: int | None = Field(None, description="Stop (with a checkpoint) after this step; resume later.")
    batch_size: int = Field(16, description="Sequences per step.")
    seq_len: int = Field(128, description="Tokens per sequence.")
    optimizer: Literal["muon", "adamw"] = Field("muon", description="Muon for hidden matrices, or AdamW for all.")
    lr: float = Field(3e-3, description="Peak learning rate (Muon and AdamW share it).")
    weight_decay: float = Field(0.1, description="Decoupled weight decay.")
    warmup_steps: int = Field(30, description="Linear LR warm-up steps.")
    min_lr_ratio: float = Field(0.1, description="Cosine decay floor as a fraction of lr.")
    grad_clip: float = Field(1.0, description="Global gradient-norm clip; 0 disables.")
    eval_every: int = Field(100, description="Validation loss every N steps.")
    eval_batches: int = Field(8, description="Validation batches per evaluation.")
    checkpoint_every: int = Field(200, description="Checkpoint (and publish) every N steps.")
    code_bytes: int = Field(3_000_000, description="Bytes of stdlib sources in the corpus.")
    n_dialogues: int = Field(30_000, description="Generated arithmetic dialogues in the corpus.")
    max_difficulty: int = Field(2, description="Most digits per operand in the pretraining dialogues.")
    device: str = Field("cpu", description="torch device: cpu or cuda.")
    attention_backend: Literal["auto", "torch", "triton"] = Field(
        "torch", description="MoBA attention in training: torch = the reference (materializes every score); "
                             "triton = the Triton kernels with their backward (CUDA; CPU under TRITON_INTERPRET=1); "
                             "auto = triton on CUDA when head_dim is a power of two >= 16. The default stays torch "
                             "until tests/gpu/test_moba_backward_gpu.py has passed on a GPU.")
    progress: bool = Field(True, description="Show a tqdm progress bar.")


class RLSettings(CrescentSettings):
    """Kimi k1.5 policy optimization on arithmetic with exact-match rewards."""

    init_from: Path = Field(Path("runs/pretrain"), description="Pretraining run folder (latest checkpoint).")
    out_dir: Path = Field(Path("runs/rl"), description="RL run folder: checkpoints and metrics.")
    model_dir: Path | None = Field(None, description="Publish checkpoints to <model_dir>/<model_name>/v<step>.")
    model_name: str = Field("crescent-tiny", description="Name of the published model.")
    seed: int = Field(0, description="Seeds prompts and sampling.")
    iterations: int = Field(20, description="RL iterations (sample, filter, update).")
    prompts_per_iteration: int = Field(32, description="Prompts sampled per iteration before filtering.")
    samples_per_prompt: int = Field(8, description="k: responses per prompt.")
    max_new_tokens: int = Field(24, description="Longest response.")
    temperature: float = Field(0.7, description="Sampling temperature of the rollouts.")
    optimizer: Literal["muon", "adamw"] = Field(
        "muon", description="Policy optimizer, fresh every iteration: muon = Muon on hidden matrices + AdamW at "
                            "embedding_lr on embeddings/head/norms; adamw = AdamW at lr on everything.")
    lr: float = Field(2e-3, description="Learning rate of the policy updates (Muon's, or AdamW's with adamw).")
    embedding_lr: float = Field(1e-4, description="AdamW lr of embeddings, head and norms when optimizer=muon.")
    updates_per_iteration: int = Field(2, description="Gradient steps on each iteration's batch.")
    tau: float = Field(0.05, description="Weight of the squared log-ratio regularizer.")
    length_penalty_weight: float = Field(0.5, description="Weight of the length reward once it is on.")
    length_penalty_warmup: int = Field(5, description="Iterations before the length penalty switches on.")
    min_difficulty: int = Field(1, description="Curriculum start: digits per operand.")
    max_difficulty: int = Field(3, description="Curriculum end.")
    promote_at: float = Field(0.8, description="Move to the next difficulty when mean pass rate exceeds this.")
    eval_prompts: int = Field(100, description="Held-out prompts per evaluation (per difficulty).")
    eval_difficulty: int = Field(2, description="Digits per operand of the held-out evaluation.")
    device: str = Field("cpu", description="torch device: cpu or cuda.")
    progress: bool = Field(True, description="Show a tqdm progress bar.")


def default_model_dir() -> Path:
    return default_model_cache()
