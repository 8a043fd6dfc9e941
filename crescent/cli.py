"""The ``crescent`` command: up, serve ROLE, model ..., train ..., bench ....

``crescent up`` runs the whole cluster on one machine as separate OS processes (each a ``crescent serve ROLE``),
waits for every health check, prints the URL, restarts a service that dies (with backoff; the others keep
serving), and stops them all on Ctrl-C/SIGTERM.
Every service setting is a flag of ``crescent serve ROLE`` and an env var ``CRESCENT_<NAME>``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import runpy
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from crescent.settings import add_settings_flags, settings_from_flags

# role -> (settings class, serve function), imported lazily so `crescent serve gateway` never imports torch.
ROLES: dict[str, tuple[str, str]] = {
    "gateway": ("crescent.services.gateway.settings:GatewaySettings", "crescent.services.gateway.server:serve"),
    "conductor": ("crescent.services.conductor.settings:ConductorSettings", "crescent.services.conductor.server:serve"),
    "kvstore": ("crescent.services.kvstore.settings:KvStoreSettings", "crescent.services.kvstore.server:serve"),
    "prefill": ("crescent.services.worker.settings:PrefillSettings", "crescent.services.worker.main:serve"),
    "decode": ("crescent.services.worker.settings:DecodeSettings", "crescent.services.worker.main:serve"),
    "worker": ("crescent.services.worker.settings:WorkerSettings", "crescent.services.worker.main:serve"),
}

# Subcommands owned by other packages: name -> "module:function(argv) -> int".
DELEGATES: dict[str, str] = {
    "model": "crescent.models.cli:model_cli",
    "train": "crescent.training.cli:train_cli",
    "calibrate": "crescent.services.worker.calibrate:calibrate_cli",
}

def load(ref: str) -> Callable:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _serve(argv: list[str]) -> int:
    if not argv or argv[0] not in ROLES:
        print(f"usage: crescent serve {{{','.join(ROLES)}}} [flags]  (--help after the role lists them)",
              file=sys.stderr)
        return 2
    role = argv[0]
    settings_ref, serve_ref = ROLES[role]
    cls = load(settings_ref)
    parser = argparse.ArgumentParser(prog=f"crescent serve {role}", description=cls.__doc__, allow_abbrev=False)
    add_settings_flags(parser, cls)
    try:
        settings = settings_from_flags(cls, parser.parse_args(argv[1:]))
    except ValueError as exc:  # pydantic's ValidationError says which flag and why
        print(f"crescent serve {role}: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    from crescent.services.common.logging import setup_logging

    setup_logging(role, settings.log_level)
    load(serve_ref)(settings)
    return 0


def _delegate(name: str, argv: list[str]) -> int:
    try:
        fn = load(DELEGATES[name])
    except (ImportError, AttributeError) as exc:
        print(f"crescent {name}: not available in this build ({exc})", file=sys.stderr)
        return 2
    return int(fn(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = ["up", "serve", "bench", *DELEGATES]
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        print("usage: crescent {" + ",".join(commands) + "} ...\n\n" + (__doc__ or ""),
              file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    if command == "up":
        return up(rest)
    if command == "serve":
        return _serve(rest)
    if command == "bench":
        return _bench(rest)
    return _delegate(command, rest)


def _bench_root() -> Path | None:
    """The ``bench`` package of a source checkout: the current directory's (where ``make bench`` runs), else the
    one beside this installed package (an editable install). Benchmarks are not part of an installed wheel or the
    Docker images."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (root / "bench" / "__init__.py").is_file():
            return root
    return None


def _bench(argv: list[str]) -> int:
    """``crescent bench AREA/NAME [args]`` runs the module bench.AREA.NAME; with no name, lists them.

    A bare NAME works too when only one area has it (``crescent bench replay`` = ``crescent bench serving/replay``).
    """
    root = _bench_root()
    if root is None:
        print("crescent bench: the benchmarks live in a source checkout (bench/); run this from its root",
              file=sys.stderr)
        return 2
    scripts = sorted(p.relative_to(root / "bench").with_suffix("").as_posix()
                     for p in (root / "bench").glob("*/*.py") if not p.name.startswith("_"))
    if argv and "/" not in argv[0]:
        matches = [s for s in scripts if s.rsplit("/", 1)[-1] == argv[0]]
        if len(matches) == 1:
            argv = [matches[0], *argv[1:]]
    if not argv or argv[0] not in scripts:
        print("usage: crescent bench AREA/NAME [args]; available: " + (", ".join(scripts) or "none"),
              file=sys.stderr)
        return 0 if not argv else 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    module = "bench." + argv[0].replace("/", ".")
    sys.argv = [module, *argv[1:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


# --- crescent up ----------------------------------------------------------------------------------------------
def _up_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="crescent up", description="Run the whole cluster on this machine.",
                                allow_abbrev=False)  # `--mode` must never be read as `--model`
    p.add_argument("model_arg", nargs="?", metavar="MODEL", default=None,
                   help="the model to serve, as `vllm serve MODEL`: 'default', a folder, a published model directory "
                        "or a Hugging Face id in the local HF cache (same as --model)")
    p.add_argument("--model", default="default", help="model name or folder served by the workers")
    p.add_argument("--api-key", default="", help="clients must send `Authorization: Bearer KEY` (env "
                                                 "CRESCENT_API_KEY works too)")
    p.add_argument("--max-model-len", type=int, default=0, help="context length for the gateway and the workers "
                                                                "(0: the model's)")
    p.add_argument("--tiny", action="store_true", help="serve a tiny random model (fast start; for demos/tests)")
    p.add_argument("--served-model-name", default="", help="model id clients send (default: the folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="gateway listen address")
    p.add_argument("--port", type=int, default=8000, help="gateway HTTP port")
    p.add_argument("--free-ports", action="store_true", help="pick free ports for every internal service")
    p.add_argument("--mode", choices=("disagg", "agg"), default="disagg",
                   help="disagg: separate prefill and decode workers; agg: workers that do both in one engine")
    p.add_argument("--prefill", type=int, default=1, help="prefill workers (disagg)")
    p.add_argument("--decode", type=int, default=1, help="decode workers (disagg)")
    p.add_argument("--workers", type=int, default=1, help="aggregated workers (agg)")
    p.add_argument("--engine", choices=("crescent", "vllm"), default="crescent",
                   help="the workers' engine: crescent's own, or vLLM's (AsyncLLM in-process; needs `make vllm`)")
    p.add_argument("--vllm-python", default=os.environ.get("CRESCENT_VLLM_PYTHON", ""),
                   help="--engine vllm: the Python that has vLLM (env CRESCENT_VLLM_PYTHON; default "
                        ".venv-vllm/bin/python in the current directory or the source checkout)")
    p.add_argument("--cost-model", default="", help="the conductor's cost model JSON (from `crescent calibrate`); "
                                                    "default: calibrate this model on this machine once (cached)")
    p.add_argument("--no-calibrate", action="store_true", help="no measured cost model: the conductor plans with "
                                                               "its built-in estimate and rejects on load")
    p.add_argument("--calibrate-timeout-s", type=float, default=300.0,
                   help="give up calibrating after this long (then as --no-calibrate)")
    p.add_argument("--log-dir", default="", help="per-service logs (default: a new temp folder)")
    p.add_argument("--startup-timeout-s", type=float, default=600.0, help="give up if not healthy by then")
    return p


def _resolve_model(args: argparse.Namespace) -> tuple[str, str]:
    """Resolve (and prepare, once, here) the model, so the workers never race to convert it."""
    if args.tiny:
        from crescent.models.prepare import make_tiny_model
        from crescent.settings import default_model_cache

        folder = default_model_cache() / "crescent-tiny"
        if not (folder / "config.json").is_file():
            make_tiny_model(folder)
        path = folder
    else:
        from crescent.models.prepare import prepare_model
        from crescent.models.published import is_published_dir

        path = Path(prepare_model(args.model))  # fails early when no published version is valid
        if is_published_dir(args.model):  # serve the directory itself: the workers hot-reload its new versions
            path = Path(args.model).expanduser().resolve()
    from crescent.models.registry import hf_cache_snapshot

    # a Hugging Face id is served under that id (as vllm serve does), not its snapshot folder's hash
    hf_id = args.model if not Path(args.model).expanduser().exists() and hf_cache_snapshot(args.model) else ""
    return str(path), args.served_model_name or hf_id or path.name


class _Stop(Exception):
    pass


def _cost_model(args: argparse.Namespace, model: str, log_dir: Path) -> str:
    """The cost model the conductor gets: the given file, or this machine's calibration (cached), or none."""
    from crescent.services.common.launcher import calibrated_cost_model, torch_threads_per_worker

    if args.cost_model:
        return str(Path(args.cost_model).expanduser().resolve())
    if args.no_calibrate or os.environ.get("CRESCENT_COST_MODEL_PATH"):  # the environment's reaches the conductor
        return ""
    if args.engine == "vllm":  # calibration times crescent's engine; vLLM workers' costs are not measured yet
        print("cost model: not calibrated for --engine vllm: admission rejects on load with the built-in estimate",
              flush=True)
        return ""
    workers = args.workers if args.mode == "agg" else args.prefill + args.decode
    threads = int(os.environ.get("CRESCENT_TORCH_THREADS") or torch_threads_per_worker(workers))
    print(f"cost model: calibrating {Path(model).name} on this machine ({threads} torch threads per worker; once, "
          "then cached)", flush=True)
    started = time.monotonic()
    try:
        path = calibrated_cost_model(model, threads, args.calibrate_timeout_s, log_dir / "calibrate.log")
    except RuntimeError as exc:
        print(f"crescent up: no measured cost model ({exc}; see {log_dir / 'calibrate.log'}): admission rejects on "
              "load with the built-in estimate", file=sys.stderr, flush=True)
        return ""
    print(f"cost model: {path} ({time.monotonic() - started:.0f}s)", flush=True)
    return path


def up(argv: list[str]) -> int:
    from crescent.services.common.launcher import ServiceGroup, plan_local_cluster, vllm_python

    args = _up_parser().parse_args(argv)
    if args.model_arg is not None:
        if args.model != "default" and args.model != args.model_arg:
            print("crescent up: the model is given twice (MODEL and --model); give it once", file=sys.stderr)
            return 2
        args.model = args.model_arg
    worker_python = ""
    if args.engine == "vllm":
        try:
            worker_python = vllm_python(args.vllm_python, (Path.cwd(), Path(__file__).resolve().parents[1]))
        except ValueError as exc:
            print(f"crescent up: {exc}", file=sys.stderr)
            return 2
    model, name = _resolve_model(args)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="crescent-up-"))
    # the key travels in the environment, not on a command line anyone on the machine can read (ps)
    group = ServiceGroup(log_dir, {"CRESCENT_API_KEY": args.api_key} if args.api_key else None)

    def on_signal(signum, frame):
        raise _Stop()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        extra: dict[str, dict[str, object]] = {}
        if args.max_model_len:
            extra = {role: {"max_model_len": args.max_model_len}
                     for role in ("gateway", "prefill", "decode", "worker")}
        if cost_model := _cost_model(args, model, log_dir):
            extra["conductor"] = {"cost_model_path": cost_model}
        plan = plan_local_cluster(model, name, gateway_host=args.host, gateway_port=args.port,
                                  prefill=args.prefill, decode=args.decode, free_ports=args.free_ports, extra=extra,
                                  mode=args.mode, workers=args.workers, engine=args.engine,
                                  worker_python=worker_python)
        group.env = {**plan.child_env(), **(group.env or {})}  # one internal token for this run (random unless set)
        for p in plan.processes:
            group.start(p.name, p.argv, p.health)
        print(f"starting crescent ({name}); logs in {log_dir}", flush=True)
        group.wait_healthy(args.startup_timeout_s)
        print(f"crescent is up: {plan.gateway_url}/v1 (model {name!r}); Ctrl-C stops it", flush=True)
        while True:  # a service that dies is started again (with backoff); the others keep serving
            for line in group.supervise():
                print(f"crescent up: {line} (logs in {log_dir})", file=sys.stderr, flush=True)
            time.sleep(0.25)
    except _Stop:
        print("stopping crescent", flush=True)
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"crescent up failed: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        group.stop()


if __name__ == "__main__":
    sys.exit(main())
