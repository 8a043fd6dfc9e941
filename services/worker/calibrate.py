"""``crescent calibrate``: time this machine's engine on the served model and write the conductor's cost model.

The fits and the timing protocol are the conductor's (crescent.services.conductor.calibrate, torch-free); this
module drives a real engine through them, so it lives with the worker runtime.

``crescent calibrate --cache`` is what ``crescent up`` runs before it starts the cluster: it reuses the model cached
for this (model, CPU model, accelerator, torch threads, dtype), or makes one with ``--quick`` points (a few small
prompts and batches, min of 2: well under a minute on a 2-core CPU for the default model) and caches it under
``<model cache>/cost_models/``. The last line it prints is ``cost model: PATH``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
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
from crescent.settings import add_settings_flags, default_model_cache, settings_from_flags

# Small points: the fit needs the trend, not long prompts (their cost is the same p1/p2 terms, extrapolated).
# Prompt tokens dominate the time (every decode point prefills its batch first, at every repeat): ~3,000 in all.
QUICK_PREFILL_POINTS = ((16, 0), (64, 0), (192, 0), (32, 128))
QUICK_DECODE_POINTS = ((1, 16), (4, 16), (16, 16), (4, 128))
CACHE_METHOD = "quick-2"  # changes when the quick protocol does: models cached by an older one are measured again


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


def memory_bandwidth_bps(nbytes: int = 128 << 20, repeats: int = 3) -> float:
    """Bytes/s this process copies memory at (read + write; best of ``repeats``): what a decode step reads each
    cached K/V at on a CPU, measured in well under a second."""
    import numpy as np

    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _model_fingerprint(model: str) -> str:
    """The folder's config and weight sizes: a different model under the same path is a different key."""
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return model
    parts = [(folder / "config.json").read_text() if (folder / "config.json").is_file() else ""]
    parts += [f"{f.name}:{f.stat().st_size}" for f in sorted(folder.glob("*.safetensors"))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _engine_fingerprint(settings: EngineSettings) -> str:
    """The code a step's time depends on (the model, its attention, the CPU kernel) and whether the kernel is in
    use: a faster engine must not be admitted by the cost model of a slower one."""
    from crescent import kernels
    from crescent.models import attention

    root = Path(attention.__file__).parent
    files = [root / "llama.py", root / "attention.py", Path(kernels.__file__).parent / "cpu" / "paged_decode.cpp"]
    uses_kernel = False
    if settings.resolved_device().type == "cpu" and settings.attention_backend in ("auto", "cpu"):
        from crescent.kernels import cpu

        uses_kernel = cpu.available()
    digest = hashlib.sha256(b"".join(f.read_bytes() for f in files if f.is_file()) + bytes([uses_kernel]))
    return digest.hexdigest()[:16]


def cache_key(settings: EngineSettings) -> dict[str, str]:
    """What a cost model depends on: the model, the engine's code, the CPU (or GPU), the torch threads and the
    dtype."""
    import torch

    device = settings.resolved_device()
    threads = settings.torch_threads or torch.get_num_threads()
    return {"method": CACHE_METHOD, "model": str(Path(settings.model).expanduser()), "model_fingerprint": _model_fingerprint(settings.model),
            "engine": _engine_fingerprint(settings),
            "cpu": _cpu_model(), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": str(threads), "dtype": str(settings.resolved_dtype()).removeprefix("torch.")}


def cached_path(cache_dir: Path, key: dict[str, str]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"{Path(key['model']).name}-{digest}.json"


def busy_reason(load_1min: float, cores: int) -> str:
    """Why a calibration just made should not be cached ('' = it may be): the machine ran more than half again as
    many runnable tasks as it has cores, so every timing is inflated by others' work. A cached model outlives the
    moment; one measured under load makes admission refuse requests the quiet machine would serve."""
    if load_1min > 1.5 * cores:
        return f"load average {load_1min:.1f} on {cores} cores"
    return ""


def _usable(path: Path) -> bool:
    from crescent.services.conductor.cost_model import CostModel

    try:
        model = CostModel.load(path)
    except (OSError, ValueError, TypeError):
        return False
    return model.calibrated and not fit_problems(model)


def calibrate_cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="crescent calibrate", description=__doc__)
    parser.add_argument("--out", default="", help="Where to write the cost model JSON (required without --cache).")
    parser.add_argument("--cache", nargs="?", const=str(default_model_cache() / "cost_models"), default="",
                        help="Reuse the model cached in this folder for this model, CPU, threads and dtype, or "
                             "calibrate and cache one (default folder: <model cache>/cost_models).")
    parser.add_argument("--quick", action="store_true", help="The small point set (for --cache): seconds, not "
                                                             "minutes; min of 2 per point, 4 decode steps.")
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
    if not args.out and not args.cache:
        parser.error("give --out PATH, or --cache [DIR]")
    if args.quick:
        args.prefill_points, args.decode_points = QUICK_PREFILL_POINTS, QUICK_DECODE_POINTS
        args.repeats, args.statistic, args.decode_steps = 2, "min", 4
    key: dict[str, str] = {}
    if args.cache:
        key = cache_key(settings)
        cached = cached_path(Path(args.cache), key)
        if _usable(cached):
            print(f"reusing the cost model calibrated for {key}\ncost model: {cached}")
            return 0
        args.out = args.out or str(cached)
    # Quick points have short contexts: d2 (per context token) comes from the memory bandwidth, on a CPU.
    kv_read_bps = memory_bandwidth_bps() if args.quick and settings.resolved_device().type == "cpu" else None
    model, samples = calibrate_with_samples(
        lambda: EngineProfile(LLMEngine.from_settings(settings), decode_steps=args.decode_steps),
        args.prefill_points, args.decode_points, repeats=args.repeats, statistic=args.statistic,
        kv_read_bps=kv_read_bps,
        source=f"calibrated: model={settings.model} device={settings.resolved_device()} dtype={settings.dtype} "
               f"threads={settings.torch_threads or 'default'}; {args.statistic} of {args.repeats} per point, "
               f"{args.decode_steps} decode steps per timing"
               + (f"; d2 from {kv_read_bps / 1e9:.1f} GB/s memory bandwidth" if kv_read_bps else "")
               + (f"; key {key}" if key else "")
               + (f"; {args.note}" if args.note else ""))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{args.out}.{os.getpid()}.tmp")
    model.save(tmp)
    tmp.replace(args.out)  # a concurrent `crescent up` reads a whole file or none
    if args.samples_out:
        Path(args.samples_out).write_text(json.dumps(samples, indent=2) + "\n")
    print(model.to_json())
    for kind, rows in samples.items():
        for row in rows:
            print(kind, " ".join(f"{k}={v}" for k, v in row.items()))
    for problem in fit_problems(model):
        print("WARNING:", problem)
    if args.cache and fit_problems(model):
        Path(args.out).unlink()  # never cached: the next `crescent up` measures again
        return 1
    if args.cache and (busy := busy_reason(os.getloadavg()[0], len(os.sched_getaffinity(0)))):
        # this run uses it; the cache key's file is not left behind, so the next start measures again
        busy_out = Path(args.out).with_suffix(".busy.json")
        Path(args.out).replace(busy_out)
        args.out = str(busy_out)
        print(f"WARNING: the machine was busy while calibrating ({busy}): this model is used now but not cached")
    print(f"cost model: {args.out}")
    return 0
