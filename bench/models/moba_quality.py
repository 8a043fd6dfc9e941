"""The quality cost of serving full-attention SmolLM2 with MoBA, training-free.

    python -m bench.models.moba_quality [--window 1024] [--windows 4] [--prompts 4] [--new-tokens 24]

Same weights, attention swapped per layer with ``with_attention`` (all layers, or all but the last few):
1. Perplexity on held-out text that ships with Python (pydoc pages and sources of stdlib modules; the model never
   saw these exact windows in our pipeline), ``--windows`` windows of ``--window`` tokens, split by position:
   tokens before ``block * topk`` see the same keys under MoBA as under full attention (every block is selected),
   so the cost shows in the later tokens.
2. Chat prompts over a long passage (a stdlib doc page + a question): greedy answers of full vs MoBA, reported as
   (a) teacher-forced top-1 agreement: MoBA's argmax at each position of full's answer equals full's token, and
   (b) the share of full's greedy tokens that MoBA's own greedy answer reproduces before the first divergence.
Greedy answers run on the paged path (prefill, then one-token decode steps), as the engine serves them.
"""

from __future__ import annotations

import argparse
import math
import os
import pydoc
import time

import torch
import torch.nn.functional as F

from bench.results_io import write_result
from crescent.models.attention_context import AttentionContext, SeqSlice
from crescent.models.config import with_attention
from crescent.models.llama import LlamaForCausalLM
from crescent.models.loader import load_model
from crescent.models.prepare import ensure_default_model

PPL_SOURCES = ["argparse", "textwrap", "functools", "shlex", "fractions", "json.decoder"]
CHAT_SOURCES = [("fnmatch", "Which function should I use to filter a list of names by a pattern, and how does "
                             "it treat case?"),
                ("bisect", "Explain in two sentences what insort does."),
                ("heapq", "How do I get the three smallest items of a list with this module?"),
                ("secrets", "What is the difference between this module and the random module?"),
                ("shlex", "How do I split a shell command line into a list of arguments?"),
                ("glob", "Does this module match hidden files by default?")]
PAGE = 16


def doc_text(module: str) -> str:
    mod = __import__(module, fromlist=["_"])
    return pydoc.render_doc(mod, renderer=pydoc.plaintext)


def source_text(module: str) -> str:
    import inspect

    return inspect.getsource(__import__(module, fromlist=["_"]))


def ppl_windows(tok, window: int, count: int) -> list[list[int]]:
    """One window per source, alternating pydoc prose and source code, each the first ``window`` tokens."""
    out = []
    for i, name in enumerate(PPL_SOURCES):
        text = doc_text(name) if i % 2 == 0 else source_text(name)
        ids = tok.encode(text)
        if len(ids) >= window:
            out.append(ids[:window])
        if len(out) == count:
            break
    return out


def nll_by_position(model: LlamaForCausalLM, ids: list[int]) -> torch.Tensor:
    """Per-token negative log-likelihood ``[len(ids) - 1]`` (token t+1 given tokens ..t)."""
    x = torch.tensor([ids])
    logits = model.forward_dense(x)[0, :-1]
    return F.cross_entropy(logits, x[0, 1:], reduction="none")


def greedy_paged(model: LlamaForCausalLM, prompt: list[int], new_tokens: int, eos: set[int]) -> list[int]:
    """Prefill the prompt into a paged cache, then decode one token per forward (the engine's path)."""
    cfg = model.config
    blocks = -(-(len(prompt) + new_tokens) // PAGE)
    caches = [tuple(torch.zeros(blocks, PAGE, cfg.num_kv_heads, cfg.head_dim) for _ in range(2))
              for _ in range(cfg.num_layers)]
    table = list(range(blocks))
    ids, out = list(prompt), []
    step = ids
    while len(out) < new_tokens:
        start = len(ids) - len(step)
        pos = torch.arange(start, len(ids))
        ctx = AttentionContext(seqs=[SeqSlice(0, len(step), len(ids), table[: -(-len(ids) // PAGE)])],
                               slot_mapping=pos, kv_caches=caches, block_size=PAGE)
        hidden = model(torch.tensor(step), pos, ctx)
        nxt = int(model.compute_logits(hidden[-1:])[0].argmax())
        out.append(nxt)
        if nxt in eos:
            break
        ids.append(nxt)
        step = [nxt]
    return out


def teacher_forced_agreement(model: LlamaForCausalLM, prompt: list[int], answer: list[int]) -> float:
    if not answer:
        return 1.0
    logits = model.forward_dense(torch.tensor([prompt + answer]))[0, len(prompt) - 1 : -1]
    return float((logits.argmax(-1) == torch.tensor(answer)).float().mean())


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def chat_prompts(tok, count: int, passage_tokens: int) -> list[list[int]]:
    prompts = []
    for name, question in CHAT_SOURCES[:count]:
        passage = tok.decode(tok.encode(doc_text(name))[:passage_tokens])
        content = f"Here is the documentation of a Python module:\n\n{passage}\n\n{question}"
        prompts.append(tok.encode(tok.apply_chat_template([{"role": "user", "content": content}])))
    return prompts


def settings(num_layers: int) -> dict[str, dict]:
    last3 = list(range(num_layers - 3, num_layers))
    return {
        "full": {"kind": "full"},
        "moba_b64_k3": {"kind": "moba", "moba_block_size": 64, "moba_topk": 3},
        "moba_b64_k3_last3full": {"kind": "moba", "moba_block_size": 64, "moba_topk": 3, "full_layers": last3},
        "moba_b32_k4": {"kind": "moba", "moba_block_size": 32, "moba_topk": 4},
        "moba_b128_k2": {"kind": "moba", "moba_block_size": 128, "moba_topk": 2},
        "moba_b64_k6": {"kind": "moba", "moba_block_size": 64, "moba_topk": 6},
        # Control: top-k covering every block of a 1024-token window is full attention, so this must equal full.
        "moba_b64_k16_control": {"kind": "moba", "moba_block_size": 64, "moba_topk": 16},
    }


def evaluate(model, name: str, spec: dict, windows, prompts, full_answers, new_tokens: int, eos,
             full_nll: torch.Tensor | None) -> tuple[dict, torch.Tensor]:
    """-> (results, per-token NLL); ``full_nll`` (None for the full model itself) gives the same-token baseline."""
    dense_cover = spec.get("moba_block_size", 0) * spec.get("moba_topk", 0) if spec["kind"] == "moba" else 0
    nll = torch.cat([nll_by_position(model, w) for w in windows])
    ref = nll if full_nll is None else full_nll
    # Token t+1 is predicted at position t: MoBA can differ only where position t >= block * topk.
    positions = torch.arange(len(windows[0]) - 1).repeat(len(windows))
    late = positions >= dense_cover
    res = {"ppl": math.exp(float(nll.mean())), "ppl_full_same_tokens": math.exp(float(ref.mean())),
           "late_from_position": dense_cover, "answers": []}
    res["ppl_ratio"] = res["ppl"] / res["ppl_full_same_tokens"]
    if bool(late.any()):  # none when block * topk covers the whole window (the control setting)
        res["ppl_late"] = math.exp(float(nll[late].mean()))
        res["ppl_late_full"] = math.exp(float(ref[late].mean()))
        res["ppl_late_ratio"] = res["ppl_late"] / res["ppl_late_full"]
    for prompt, ref in zip(prompts, full_answers, strict=True):
        mine = ref if name == "full" else greedy_paged(model, prompt, new_tokens, eos)
        res["answers"].append({"prompt_tokens": len(prompt), "tokens": mine,
                               "teacher_forced_agreement": teacher_forced_agreement(model, prompt, ref),
                               "greedy_prefix_share": common_prefix(mine, ref) / max(len(ref), 1)})
    res["teacher_forced_agreement"] = sum(a["teacher_forced_agreement"] for a in res["answers"]) / len(prompts)
    res["greedy_prefix_share"] = sum(a["greedy_prefix_share"] for a in res["answers"]) / len(prompts)
    return res, nll


def _with_weights_of(full: LlamaForCausalLM, config) -> LlamaForCausalLM:
    """The same weights under another attention layout (built on meta, then the full model's tensors copied)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict({k: v.clone() for k, v in full.state_dict().items()}, assign=True)
    model.tie_weights()
    return model.eval().prepare_for_inference()


def plot(results: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    xs = list(range(len(names)))
    a1.bar([x - 0.2 for x in xs], [results[n]["ppl_ratio"] for n in names], 0.4, label="all tokens")
    a1.bar([x + 0.2 for x in xs], [results[n].get("ppl_late_ratio", 0.0) for n in names], 0.4,
           label="tokens at positions >= block*topk")
    a1.axhline(1.0, color="gray", lw=0.8)
    a1.set_ylabel("perplexity / full attention's (same tokens)")
    a1.legend()
    a2.bar([x - 0.2 for x in xs], [results[n]["teacher_forced_agreement"] for n in names], 0.4,
           label="teacher-forced top-1 agreement")
    a2.bar([x + 0.2 for x in xs], [results[n]["greedy_prefix_share"] for n in names], 0.4,
           label="greedy prefix shared with full")
    a2.set_ylim(0, 1.05)
    a2.legend(loc="lower left")
    for ax in (a1, a2):
        ax.set_xticks(xs, names, rotation=25, ha="right")
    fig.suptitle("SmolLM2-135M served with training-free MoBA vs full attention")
    return fig


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--window", type=int, default=1024, help="tokens per perplexity window")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=4, help=f"chat prompts (at most {len(CHAT_SOURCES)})")
    ap.add_argument("--passage-tokens", type=int, default=600)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--only", nargs="*", help="setting names to run (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="models_moba_quality")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = ensure_default_model()
    full, tok, cfg = load_model(folder)
    windows = ppl_windows(tok, args.window, args.windows)
    prompts = chat_prompts(tok, args.prompts, args.passage_tokens)
    eos = set(tok.eos_token_ids)
    t0 = time.perf_counter()
    results: dict = {}
    full_nll = None
    with torch.inference_mode():
        full_answers = [greedy_paged(full, p, args.new_tokens, eos) for p in prompts]
    for name, spec in settings(cfg.num_layers).items():
        if args.only and name not in args.only and name != "full":  # full is every setting's baseline
            continue
        model = full
        if spec["kind"] == "moba":
            model = _with_weights_of(full, with_attention(cfg, **spec))
        t = time.perf_counter()
        with torch.inference_mode():
            results[name], nll = evaluate(model, name, spec, windows, prompts, full_answers, args.new_tokens, eos,
                                          full_nll)
        if spec["kind"] == "full":
            full_nll = nll
        results[name]["seconds"] = time.perf_counter() - t
        print(name, {k: round(v, 4) for k, v in results[name].items() if isinstance(v, float)}, flush=True)
    config = {"model": str(folder), "dtype": "float32", "window": args.window, "windows": len(windows),
              "ppl_sources": PPL_SOURCES[: len(windows)], "chat_sources": [s for s, _ in CHAT_SOURCES[: len(prompts)]],
              "passage_tokens": args.passage_tokens, "new_tokens": args.new_tokens, "page_size": PAGE,
              "settings": settings(cfg.num_layers), "threads": args.threads, "total_seconds": time.perf_counter() - t0,
              "loadavg_after": os.getloadavg(),
              "full_answers": [tok.decode(a) for a in full_answers]}
    path = write_result(args.name, config, results, plot(results))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
