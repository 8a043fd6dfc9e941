"""What the vLLM e2e modules share: the Python with vLLM, test prompts, and the vllm.LLM reference subprocess."""

from __future__ import annotations

import inspect
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from crescent.services.common.launcher import vllm_python

REPO = Path(__file__).resolve().parents[2]
MAX_MODEL_LEN = 2048
GREEDY_TOKENS = 12
# vLLM's engine as the workers build it (crescent/engine/vllm_engine.py's engine_args), for the reference
ENGINE = {"dtype": "float32", "max_model_len": MAX_MODEL_LEN, "block_size": 32, "enable_prefix_caching": True,
          "enforce_eager": True}


def vllm_python_or_skip() -> str:
    try:
        return vllm_python(os.environ.get("CRESCENT_VLLM_PYTHON", ""), (REPO,))
    except ValueError as exc:
        pytest.skip(f"no Python with vLLM: {exc}", allow_module_level=True)


def prompts(spans: list[tuple[int, int]]) -> list[list[int]]:
    """Token-id slices of stdlib source text through the served model's tokenizer (deterministic, 100s of tokens)."""
    import json as json_module

    from crescent.models.prepare import prepare_model
    from crescent.models.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(Path(prepare_model("default")))
    ids = tok.encode(inspect.getsource(json_module.decoder) + inspect.getsource(json_module.encoder))
    return [ids[a:b] for a, b in spans]


def start_reference(python: str, tmp: Path, token_prompts: list[list[int]], env: dict[str, str]) -> subprocess.Popen:
    """``vllm.LLM.generate`` (greedy) on ``token_prompts`` in a subprocess; its answer lands in tmp/ref-out.json."""
    from crescent.models.prepare import prepare_model

    spec = {"model": str(prepare_model("default")), "prompts": token_prompts, "max_tokens": GREEDY_TOKENS,
            "engine": ENGINE}
    (tmp / "ref-in.json").write_text(json.dumps(spec))
    return subprocess.Popen([python, str(REPO / "tests/e2e/vllm_reference.py"), str(tmp / "ref-in.json"),
                             str(tmp / "ref-out.json")], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(tmp / "reference.log", "wb"), start_new_session=True)  # noqa: SIM115


def reference_outputs(proc: subprocess.Popen, tmp: Path, timeout_s: float) -> list[dict]:
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        pytest.fail("the vllm.LLM reference did not finish in time")
    assert proc.returncode == 0, tail(tmp / "reference.log")
    reference = json.loads((tmp / "ref-out.json").read_text())
    print(f"vllm.LLM (reference) built in {reference['load_s']:.0f} s")
    return reference["outputs"]


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else f"({path} missing)"


def assert_greedy_equal(client, model: str, token_prompts: list[list[int]], reference: list[dict]) -> None:
    """Each prompt's greedy completion through the cluster equals vllm.LLM's: its text and its token count."""
    for prompt, ref in zip(token_prompts, reference, strict=True):
        reply = client.completions.create(model=model, prompt=prompt, max_tokens=GREEDY_TOKENS, temperature=0,
                                          logprobs=0)
        choice = reply.choices[0]
        assert choice.text == ref["text"], f"prompt of {len(prompt)} tokens"
        assert reply.usage.completion_tokens == len(ref["token_ids"]) == len(choice.logprobs.tokens)


def stop_up_and_reference(up: subprocess.Popen, reference: subprocess.Popen) -> None:
    """Stop `crescent up` as Ctrl-C does (it must exit 0) and the reference process; kill either's process group if
    it is still there after."""
    for p in (up, reference):
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGINT if p is up else signal.SIGTERM)
    try:
        assert up.wait(timeout=60) == 0
    finally:
        for p in (up, reference):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
