"""The engine's settings (shared by the prefill and decode services, which subclass or embed them)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from crescent.settings import CrescentSettings


class EngineSettings(CrescentSettings):
    model: str = Field("default", description="Model to serve: 'default' (the prepared SmolLM2-135M-Instruct), "
                                              "a local HF-format folder, or a published model directory "
                                              "(<model_dir>/<name>/ holding v* versions: hot-reloaded).")
    served_model_name: str = Field("", description="Name the model is served and hashed under; empty means the "
                                                   "model folder's name.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available, else cpu.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights and KV cache dtype; auto = bfloat16 on CUDA and on CPUs with native bf16 "
        "(avx512_bf16 or AMX: 1.5-2x float32), float32 on other CPUs.")
    kv_block_size: int = Field(16, ge=1, description="Tokens per paged KV block (also the prefix-hash block).")
    num_kv_blocks: int = Field(0, ge=0, description="Paged KV blocks; 0 = as many as kv_cache_memory_bytes holds.")
    kv_cache_memory_bytes: int = Field(512 * 2**20, ge=1, description="KV cache size when num_kv_blocks is 0.")
    max_num_seqs: int = Field(64, ge=1, description="Most sequences in one batch.")
    max_num_batched_tokens: int = Field(2048, ge=1, description="Token budget of one forward pass; longer prompts "
                                                                "are prefilled in chunks.")
    max_model_len: int = Field(0, ge=0, description="Longest prompt + output; 0 = the model's "
                                                    "max_position_embeddings (capped by the KV cache).")
    enable_prefix_caching: bool = Field(True, description="Reuse KV of identical prompt prefixes (full blocks).")
    torch_threads: int = Field(0, ge=0, description="torch.set_num_threads value; 0 leaves torch's default "
                                                    "(set it when several workers share few cores). vLLM on CPU: "
                                                    "its OpenMP threads, unpinned (vllm_engine.cpu_thread_env).")
    attention_backend: Literal["auto", "torch", "triton", "cpu"] = Field(
        "auto", description="Attention implementation passed to the model: auto = triton on CUDA; on CPU, torch "
                            "with the C++ paged-decode kernel (crescent.kernels.cpu, built on first start; the torch "
                            "path where no compiler is); torch = torch only; cpu = the kernel or a start-up error.")
    model_watch_interval_s: float = Field(5.0, ge=0, description="When model is a published model directory: how "
                                                                 "often to look for a newer version (0 = never).")

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            fast_bf16 = self.resolved_device().type == "cuda" or cpu_has_native_bf16()
            return torch.bfloat16 if fast_bf16 else torch.float32
        return getattr(torch, self.dtype)


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when this x86 CPU computes bf16 natively (avx512_bf16 or AMX's amx_bf16): there bf16 matmuls beat
    float32 (measured 1.5-2.2x on this project's machines); elsewhere they are emulated and slower."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


class VllmEngineSettings(EngineSettings):
    """The engine settings plus what vLLM's engine (crescent/engine/vllm_engine.py) reads. The shared fields keep
    their meaning: dtype (auto resolves as for crescent's engine), kv_block_size (the store's and the prefix
    hashes' block), max_model_len, max_num_seqs, max_num_batched_tokens, enable_prefix_caching."""

    vllm_kv_cache_gib: float = Field(1.0, gt=0, description="vLLM on CPU: its KV cache size in GiB "
                                                            "(VLLM_CPU_KVCACHE_SPACE); without it vLLM asks for most "
                                                            "of the machine's memory.")
    vllm_gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vLLM on CUDA: the share of GPU memory "
                                                                            "it may use (weights + KV cache).")
    vllm_block_size: int = Field(0, ge=0, description="vLLM's KV block size in tokens; 0 = kv_block_size, rounded "
                                                      "up to a multiple of 32 on CPU (vLLM's CPU attention needs "
                                                      "it). Store blocks stay kv_block_size tokens.")
    vllm_enforce_eager: bool = Field(True, description="Run vLLM without torch.compile/CUDA graphs: on a small CPU "
                                                       "it starts in about a minute instead of several; turn off on "
                                                       "GPUs for speed.")
    vllm_kv_connector: Literal["auto", "crescent", "none"] = Field(
        "auto", description="How a vLLM worker moves KV to and from the kvstore: crescent = CrescentConnector "
        "(services/worker/vllm_connector.py; start fails without it), auto = it when installed, none = KV stays in "
        "the engine (a disaggregated decode recomputes the prompt).")
