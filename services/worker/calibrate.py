"""``crescent calibrate``: time this machine's engine on the served model and write the conductor's cost model.

The fits and the timing protocol are the conductor's (crescent.services.conductor.calibrate, torch-free); this
module drives a real engine through them, so it lives with the worker runtime.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from crescent.engine.llm_engine import LLMEngine
from crescent.engine.settings import EngineSettings
from crescent.services.conductor.calibrate import (
    DEFAULT_DECODE_POINTS,
    DEFAULT_PREFILL_POINTS,
    STATISTICS,
    calibrate_with_samples,
    fit_problems,
)
from crescent.settings import add_settings_flags, settings_from_flags


class EngineProfile:
    """Times a real ``LLMEngine``. Prompts are fresh random tokens, so only the intended prefix is ever cached."""

    def __init__(self, engine, seed: int = 0, decode_steps: int = 8) -> None:
        from crescent.engine.model_runner import kv_block_bytes

        self.engine = engine
        self.rng = random.Random(seed)
        dtype = next(engine.model.parameters()).dtype
        bs = engine.settings.kv_block_size
        self.kv_bytes_per_token = kv_block_bytes(engine.config, bs, dtype) // bs
        self._n = 0
        self.decode_steps = decode_steps

    def _tokens(self, n: int) -> list[int]:
        vocab = self.engine.config.vocab_size
        return [self.rng.randrange(vocab) for _ in range(n)]

    def _params(self, max_tokens: int):
        from crescent.engine.sampling_params import SamplingParams

        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    def _sync(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def time_prefill(self, new_tokens: int, cached_tokens: int) -> float:
        prefix = self._tokens(cached_tokens)
        if cached_tokens:
            self.engine.generate([prefix], self._params(1))  # puts the prefix in the prefix cache
        prompt = prefix + self._tokens(new_tokens)
        self._sync()
        start = time.perf_counter()
        self.engine.generate([prompt], self._params(1))
        self._sync()
        return time.perf_counter() - start

    def time_decode_step(self, batch: int, context_per_seq: int) -> float:
        steps = self.decode_steps
        ids = []
        for _ in range(batch):
            self._n += 1
            ids.append(f"calib-{self._n}")
            self.engine.add_request(ids[-1], self._tokens(context_per_seq), self._params(steps + 2))
        started: set[str] = set()
        while len(started) < batch:  # run every prefill first: only steady decode steps are timed
            started.update(o.request_id for o in self.engine.step() if o.new_token_ids)
        self._sync()
        start = time.perf_counter()
        for _ in range(steps):
            self.engine.step()
        self._sync()
        elapsed = (time.perf_counter() - start) / steps
        while self.engine.has_unfinished_requests():
            self.engine.step()
        return elapsed


def _points(text: str) -> tuple[tuple[int, int], ...]:
    try:
        pairs = tuple(tuple(int(x) for x in item.split(":")) for item in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a,b pairs like 64:0,256:0; got {text!r}") from None
    if len(pairs) < 3 or any(len(p) != 2 or min(p) < 0 for p in pairs):
        raise argparse.ArgumentTypeError(f"need >= 3 non-negative a:b pairs, got {text!r}")
    return pairs  # type: ignore[return-value]


def calibrate_cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crescent calibrate", description=__doc__)
    parser.add_argument("--out", required=True, help="Where to write the cost model JSON.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--statistic", choices=sorted(STATISTICS), default="median",
                        help="Per point: median of the repeats, or min (best of N; steadier on a busy machine).")
    parser.add_argument("--prefill-points", type=_points, default=DEFAULT_PREFILL_POINTS,
                        help="new:cached token pairs to time prefill at, e.g. 64:0,256:0,256:256")
    parser.add_argument("--decode-points", type=_points, default=DEFAULT_DECODE_POINTS,
                        help="batch:context-per-sequence pairs to time a decode step at, e.g. 1:128,8:128")
    parser.add_argument("--decode-steps", type=int, default=8, help="Decode steps timed per point.")
    parser.add_argument("--samples-out", default="", help="Also write each point's measured and fitted seconds "
                                                          "(JSON) here.")
    parser.add_argument("--note", default="", help="Appended to the model's source (how/where it was made).")
    add_settings_flags(parser, EngineSettings)
    args = parser.parse_args(argv)
    settings = settings_from_flags(EngineSettings, args)
    model, samples = calibrate_with_samples(
        lambda: EngineProfile(LLMEngine.from_settings(settings), decode_steps=args.decode_steps),
        args.prefill_points, args.decode_points, repeats=args.repeats, statistic=args.statistic,
        source=f"calibrated: model={settings.model} device={settings.resolved_device()} dtype={settings.dtype} "
               f"threads={settings.torch_threads or 'default'}; {args.statistic} of {args.repeats} per point, "
               f"{args.decode_steps} decode steps per timing" + (f"; {args.note}" if args.note else ""))
    model.save(args.out)
    if args.samples_out:
        Path(args.samples_out).write_text(json.dumps(samples, indent=2) + "\n")
    print(model.to_json())
    for kind, rows in samples.items():
        for row in rows:
            print(kind, " ".join(f"{k}={v}" for k, v in row.items()))
    for problem in fit_problems(model):
        print("WARNING:", problem)
    return 0
