"""Per-step forward latency: crescent's model vs HF transformers' forward with a KV cache, same weights and dtype.

    python -m bench.models.forward [--batches 1 16] [--contexts 128 1024] [--steps 6] [--rounds 3] [--threads 1]

Decode: B sequences, each with ``context`` tokens of K/V already cached (the same random K/V in our paged cache
and in HF's DynamicCache, so the first step's logits are compared too), then ``steps`` decode steps of one token
each; a step is building the AttentionContext + ``forward`` + ``compute_logits`` for us and ``model(input_ids, past_key_values=...)`` for HF.
Prefill: one prompt of ``context`` tokens, no cache. Contenders alternate round by round so machine load drifts
hit both; each step is timed on the wall clock and on this process's CPU clock (with one torch thread the CPU
time is what the wall time would be on an idle machine; a shared machine inflates wall time far more).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from bench.results_io import write_result
from crescent.models.attention_context import AttentionContext, SeqSlice
from crescent.models.loader import load_model
from crescent.models.prepare import ensure_default_model

BLOCK = 16


class OursDecode:
    """Decode steps of our model over a paged cache holding ``context`` tokens per sequence."""

    def __init__(self, model, kv: list[tuple[torch.Tensor, torch.Tensor]], steps: int) -> None:
        self.model = model
        self.batch, n_kv, self.context, dim = kv[0][0].shape  # kv per layer: [B, Hkv, L, D]
        self.width = -(-(self.context + steps) // BLOCK)
        blocks = self.batch * self.width
        self.caches = []
        for k, v in kv:
            pair = []
            for src in (k, v):
                cache = torch.zeros(blocks, BLOCK, n_kv, dim)
                flat = cache.view(self.batch, self.width * BLOCK, n_kv, dim)
                flat[:, : self.context] = src.transpose(1, 2)
                pair.append(cache)
            self.caches.append(tuple(pair))

    def step(self, ids: torch.Tensor, done: int) -> torch.Tensor:
        pos = self.context + done
        seqs, slots = [], []
        for b in range(self.batch):
            table = list(range(b * self.width, (b + 1) * self.width))
            seqs.append(SeqSlice(b, b + 1, pos + 1, table[: pos // BLOCK + 1]))
            slots.append(table[pos // BLOCK] * BLOCK + pos % BLOCK)
        ctx = AttentionContext(seqs=seqs, slot_mapping=torch.tensor(slots), kv_caches=self.caches, block_size=BLOCK)
        hidden = self.model(ids, torch.full((self.batch,), pos), ctx)
        return self.model.compute_logits(hidden)


class HFDecode:
    """The same steps through transformers, its DynamicCache cropped back to ``context`` before each round."""

    def __init__(self, hf, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        from transformers import DynamicCache

        self.hf, self.context = hf, kv[0][0].shape[2]
        self.cache = DynamicCache(config=hf.config)
        for layer, (k, v) in enumerate(kv):
            self.cache.update(k.clone(), v.clone(), layer)

    def reset(self) -> None:
        grown = self.cache.get_seq_length() - self.context
        if grown:
            self.cache.crop(-grown)  # this transformers version takes the number of tokens to drop

    def step(self, ids: torch.Tensor, done: int) -> torch.Tensor:
        return self.hf(input_ids=ids[:, None], past_key_values=self.cache, use_cache=True).logits[:, -1].float()


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _timed(fn) -> tuple[object, float, float]:
    w, c = _clocks()
    out = fn()
    return out, (time.perf_counter() - w) * 1e3, (time.process_time() - c) * 1e3


def bench_decode(model, hf, cfg, batch: int, context: int, steps: int, rounds: int) -> dict:
    gen = torch.Generator().manual_seed(batch * 7919 + context)
    shape = (batch, cfg.num_kv_heads, context, cfg.head_dim)
    kv = [(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)) for _ in range(cfg.num_layers)]
    ours, theirs = OursDecode(model, kv, steps), HFDecode(hf, kv)
    del kv
    ids = torch.randint(0, cfg.vocab_size, (steps, batch), generator=gen)
    times = {"ours": ([], []), "hf": ([], [])}
    first: dict[str, torch.Tensor] = {}
    for r in range(rounds + 1):  # round 0 warms up and keeps each contender's first logits for the check
        theirs.reset()
        for name, runner in (("ours", ours), ("hf", theirs)) if r % 2 else (("hf", theirs), ("ours", ours)):
            for s in range(steps):
                logits, wall, cpu = _timed(lambda runner=runner, s=s: runner.step(ids[s], s))
                if r == 0 and s == 0:
                    first[name] = logits
                elif r:
                    times[name][0].append(wall)
                    times[name][1].append(cpu)
    return _summary(times, batch, {"max_abs_logit_diff_step0": float((first["ours"] - first["hf"]).abs().max())})


def bench_prefill(model, hf, cfg, length: int, rounds: int) -> dict:
    ids = torch.randint(0, cfg.vocab_size, (length,), generator=torch.Generator().manual_seed(length))
    ctx = AttentionContext(seqs=[SeqSlice(0, length, length, [])])

    def ours():
        return model.compute_logits(model(ids, torch.arange(length), ctx)[-1:])

    def theirs():
        return hf(input_ids=ids[None], use_cache=False, logits_to_keep=1).logits[0].float()

    times = {"ours": ([], []), "hf": ([], [])}
    diff = float((ours() - theirs()).abs().max())
    for r in range(rounds):
        for name, fn in (("ours", ours), ("hf", theirs)) if r % 2 else (("hf", theirs), ("ours", ours)):
            _, wall, cpu = _timed(fn)
            times[name][0].append(wall)
            times[name][1].append(cpu)
    return _summary(times, length, {"max_abs_logit_diff": diff})


def _summary(times: dict, tokens: int, extra: dict) -> dict:
    out = dict(extra)
    for name, (wall, cpu) in times.items():
        out[f"{name}_ms_wall"] = statistics.median(wall)
        out[f"{name}_ms_cpu"] = statistics.median(cpu)
        out[f"{name}_tok_s_cpu"] = tokens / statistics.median(cpu) * 1e3
    out["speedup_wall"] = out["hf_ms_wall"] / out["ours_ms_wall"]
    out["speedup_cpu"] = out["hf_ms_cpu"] / out["ours_ms_cpu"]
    return out


def plot(results: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(1.6 * len(names) + 2, 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [results[n]["hf_ms_cpu"] for n in names], 0.4, label="HF transformers")
    ax.bar([x + 0.2 for x in xs], [results[n]["ours_ms_cpu"] for n in names], 0.4, label="crescent")
    for x, n in zip(xs, names, strict=True):
        ax.annotate(f"{results[n]['speedup_cpu']:.2f}x", (x, max(results[n]["hf_ms_cpu"], results[n]["ours_ms_cpu"])),
                    ha="center", va="bottom")
    ax.set_xticks(list(xs), names, rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("ms per forward step (median, process CPU time)")
    ax.set_title("SmolLM2-135M fp32 forward on CPU: crescent vs HF")
    ax.legend()
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--contexts", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--prefill", type=int, nargs="*", default=[256], help="prompt lengths for the prefill rows")
    ap.add_argument("--steps", type=int, default=6, help="decode steps per round")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per contender (alternating)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both contenders")
    ap.add_argument("--name", default="models_forward")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    folder = ensure_default_model()
    model, _, cfg = load_model(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    load_before = os.getloadavg()
    results = {}
    with torch.inference_mode():
        for batch in args.batches:
            for context in args.contexts:
                key = f"decode_b{batch}_ctx{context}"
                results[key] = bench_decode(model, hf, cfg, batch, context, args.steps, args.rounds)
                print(key, {k: round(v, 3) for k, v in results[key].items()}, flush=True)
        for length in args.prefill:
            key = f"prefill_{length}"
            results[key] = bench_prefill(model, hf, cfg, length, args.rounds)
            print(key, {k: round(v, 3) for k, v in results[key].items()}, flush=True)
    config = {"model": str(folder), "dtype": "float32", "threads": args.threads, "block_size": BLOCK,
              "steps": args.steps, "rounds": args.rounds, "batches": args.batches, "contexts": args.contexts,
              "prefill": args.prefill, "loadavg_before": load_before, "loadavg_after": os.getloadavg()}
    path = write_result(args.name, config, results, plot(results))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
