"""Replay a request trace against a running crescent gateway through the OpenAI API (the official client).

    .venv/bin/python -m bench.serving.replay --base-url http://127.0.0.1:8000/v1 --model default \
        --limit 200 --max-duration-s 120 --block-tokens 16 --max-output 32

Each trace hash_id becomes a fixed random block of ``--block-tokens`` token ids (Mooncake issue #1266), so
requests that share hash_ids share a token prefix. Requests are sent at their (sped-up) trace times, streamed,
and timed: TTFT and every token gap (TBT = mean of the slowest 10% of a request's gaps, as in FAST'25). The same
run also replays the trace with every block made unique (no shared prefix): the baseline the ratio is taken to.
Bounded: at most ``--limit`` requests and ``--max-duration-s`` seconds per pass.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from bench.serving.sim_cluster import fast25_tbt
from bench.serving.trace import DEFAULT_TRACE, TraceRequest, load_trace


@dataclass
class ReplayResult:
    index: int
    prompt_tokens: int
    ok: bool = False
    status: str = ""
    ttft_s: float = 0.0
    gaps_s: list[float] = field(default_factory=list)
    tbt_s: float = 0.0
    completion_tokens: int = 0
    sent_s: float = 0.0  # when it was sent, from the replay's start


class PromptBuilder:
    """hash_id -> a fixed block of token ids (seeded), so equal hash prefixes give equal token prefixes."""

    def __init__(self, block_tokens: int, vocab_size: int, seed: int = 0, unique: bool = False) -> None:
        self.block_tokens, self.vocab, self.seed, self.unique = block_tokens, vocab_size, seed, unique
        self._n = 0

    def block(self, hash_id: int) -> list[int]:
        rng = random.Random(f"{self.seed}:{hash_id}")
        low = min(256, self.vocab // 2)  # stay clear of the special tokens at the bottom of the vocabulary
        return [rng.randrange(low, self.vocab) for _ in range(self.block_tokens)]

    def prompt(self, req: TraceRequest, max_blocks: int) -> list[int]:
        ids = list(req.hash_ids[:max_blocks])
        if self.unique:  # the no-sharing baseline: every block of every request is new
            ids = [-(self._n + i + 1) for i in range(len(ids))]
            self._n += len(ids)
        return [t for h in ids for t in self.block(h)]


async def stream_one(client, model: str, i: int, prompt: list[int], max_tokens: int,
                     timeout_s: float) -> ReplayResult:
    """One streamed completion, timed at the client: TTFT from the send, then every gap between tokens."""
    import openai

    res = ReplayResult(i, len(prompt))
    start = time.perf_counter()
    last = None
    try:
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, stream=True,
                                                 temperature=0.0, timeout=timeout_s,
                                                 extra_body={"ignore_eos": True})
        async for chunk in stream:
            if not chunk.choices or not chunk.choices[0].text:
                continue
            now = time.perf_counter()
            if last is None:
                res.ttft_s = now - start
            else:
                res.gaps_s.append(now - last)
            last = now
            res.completion_tokens += 1
        res.ok, res.status = True, "ok"
    except openai.RateLimitError:
        res.status = "429"
    except openai.APIError as e:
        res.status = f"error: {type(e).__name__}"
    res.tbt_s = fast25_tbt(res.gaps_s)
    return res


async def replay(trace: list[TraceRequest], base_url: str, model: str, builder: PromptBuilder, max_blocks: int,
                 max_output: int, max_duration_s: float, timeout_s: float) -> list[ReplayResult]:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="replay", max_retries=0)
    t0 = time.perf_counter()
    tasks, sent = [], []
    for i, req in enumerate(trace):
        delay = req.arrival_s - (time.perf_counter() - t0)
        if req.arrival_s > max_duration_s:
            break
        if delay > 0:
            await asyncio.sleep(delay)
        prompt = builder.prompt(req, max_blocks)
        sent.append(time.perf_counter() - t0)
        tasks.append(asyncio.create_task(stream_one(client, model, i, prompt, min(req.output_length, max_output),
                                                    timeout_s)))
    results = list(await asyncio.gather(*tasks))
    for res, at in zip(results, sent, strict=True):
        res.sent_s = at
    await client.close()
    return results


def summarize(results: list[ReplayResult], ttft_slo_s: float, tbt_slo_s: float) -> dict:
    ok = [r for r in results if r.ok]
    good = [r for r in ok if r.ttft_s <= ttft_slo_s and r.tbt_s <= tbt_slo_s]

    def pct(xs: list[float]) -> dict:
        return {f"p{q}": round(float(np.percentile(xs, q)), 4) for q in (50, 90, 99)} if xs else {}

    return {"requests": len(results), "ok": len(ok), "rejected_429": sum(r.status == "429" for r in results),
            "errors": sum(r.status.startswith("error") for r in results), "good": len(good),
            "slo_attainment": round(len(good) / max(len(results), 1), 4),
            "ttft_s": pct([r.ttft_s for r in ok]), "tbt_s": pct([r.tbt_s for r in ok if r.gaps_s])}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default="default")
    ap.add_argument("--trace", default=str(DEFAULT_TRACE))
    ap.add_argument("--limit", type=int, default=100, help="Most requests per pass.")
    ap.add_argument("--max-duration-s", type=float, default=120.0, help="Send nothing later than this.")
    ap.add_argument("--speedup", type=float, default=1.0)
    ap.add_argument("--block-tokens", type=int, default=16, help="Tokens per trace hash_id (the trace used 512).")
    ap.add_argument("--max-blocks", type=int, default=32, help="Cap on a prompt's blocks (the model's context).")
    ap.add_argument("--max-output", type=int, default=32, help="Cap on output tokens per request.")
    ap.add_argument("--vocab-size", type=int, default=49152)
    ap.add_argument("--ttft-slo-s", type=float, default=2.0)
    ap.add_argument("--tbt-slo-s", type=float, default=0.2)
    ap.add_argument("--timeout-s", type=float, default=60.0)
    ap.add_argument("--name", default="serving_replay")
    args = ap.parse_args(argv)
    trace = load_trace(args.trace, speedup=args.speedup, limit=args.limit)
    passes = {}
    for label, unique in (("shared_prefix", False), ("unique_baseline", True)):
        builder = PromptBuilder(args.block_tokens, args.vocab_size, unique=unique)
        results = asyncio.run(replay(trace, args.base_url, args.model, builder, args.max_blocks, args.max_output,
                                     args.max_duration_s, args.timeout_s))
        passes[label] = {"summary": summarize(results, args.ttft_slo_s, args.tbt_slo_s),
                         "requests": [asdict(r) | {"gaps_s": [round(g, 5) for g in r.gaps_s]} for r in results]}
        print(label, passes[label]["summary"])
    shared, base = passes["shared_prefix"]["summary"], passes["unique_baseline"]["summary"]
    ratio = {"ttft_p50_unique_over_shared": round(base["ttft_s"].get("p50", 0) / max(shared["ttft_s"].get("p50", 0),
                                                                                     1e-9), 3)}
    print("ratio", ratio)
    from bench.results_io import write_result

    write_result(args.name, vars(args), {"passes": passes, "ratio": ratio}, _plot(passes))


def _plot(passes: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for label, data in passes.items():
        ok = [r for r in data["requests"] if r["ok"]]
        ax[0].plot(sorted(r["ttft_s"] for r in ok), label=label)
        ax[1].plot(sorted(r["tbt_s"] for r in ok if r["gaps_s"]), label=label)
    ax[0].set_title("TTFT (s), sorted requests")
    ax[1].set_title("TBT (s, FAST'25: mean of slowest 10% gaps)")
    for a in ax:
        a.legend()
    return fig


if __name__ == "__main__":
    main()
