"""Kimi k1.5 RL on arithmetic: sample k responses per prompt with crescent's engine, filter, update, evaluate.

One iteration:
1. sample prompts at the curriculum's difficulty from the train split (an evaluation operand pair never appears in RL or in
   pretraining: crescent.training.tasks.in_eval_split);
2. k responses each through :class:`LLMEngine` (temperature sampling, a distinct seed per response);
3. exact-match rewards; the curriculum sees the mean pass rate; keep prompts with 0 < pass rate < 1;
4. after ``length_penalty_warmup`` iterations, add ``length_penalty_weight`` * the k1.5 length reward;
5. pi_old := the current policy (log-probs of the batch, no grad) and a fresh optimizer (state reset; Muon on
   hidden matrices, see :func:`policy_optimizer`), then
   ``updates_per_iteration`` gradient steps on the k1.5 loss (rl_loss.k15_loss) averaged over kept prompts.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from crescent.engine.sampling_params import SamplingParams
from crescent.models.config import ModelConfig
from crescent.training import checkpoint as ckpt
from crescent.training.muon import HybridOptimizer
from crescent.training.pretrain import build_model
from crescent.training.rl_loss import Curriculum, k15_loss, keep_prompt, length_rewards
from crescent.training.rollout import Sample, generate, prompt_ids, sample_seed, sequence_logprobs
from crescent.training.settings import RLSettings
from crescent.training.tasks import Problem, exact_match_reward, make_problem, make_problems
from crescent.training.tokenizer import IM_END, special_id


@dataclass
class RLResult:
    before: dict[str, float]
    after: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)


def load_policy(run_dir, device: str) -> tuple[torch.nn.Module, ModelConfig, Tokenizer, int]:
    """Model, config, tokenizer and step of a pretraining (or RL) run folder's latest checkpoint."""
    last = ckpt.latest_checkpoint(run_dir)
    if last is None:
        raise FileNotFoundError(f"no checkpoint under {run_dir}/checkpoints: run `crescent train pretrain` first")
    state = ckpt.load_checkpoint(last)
    config = ModelConfig.from_hf(state["config"])
    model = build_model(config, seed=0, device=device)
    model.load_state_dict(state["model"])
    tok_file = run_dir / "tokenizer" / "tokenizer.json"
    return model, config, Tokenizer.from_file(str(tok_file)), int(state.get("base_step", 0)) + state["step"]


def evaluate(model: torch.nn.Module, tok: Tokenizer, problems: list[Problem], max_new_tokens: int) -> dict[str, float]:
    """Greedy accuracy and mean response length (tokens) on held-out problems."""
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=[special_id(tok, IM_END)])
    samples = generate(model, tok, [prompt_ids(tok, p) for p in problems], [params] * len(problems))
    correct = [exact_match_reward(s.text, p.answer) for s, p in zip(samples, problems, strict=True)]
    return {"accuracy": sum(correct) / len(problems), "mean_length": sum(s.length for s in samples) / len(samples)}


def rollouts(model, tok: Tokenizer, problems: list[Problem], s: RLSettings, iteration: int) -> list[Sample]:
    stop = [special_id(tok, IM_END)]
    prompts, params = [], []
    for i, p in enumerate(problems):
        ids = prompt_ids(tok, p)
        for j in range(s.samples_per_prompt):
            prompts.append(ids)
            params.append(SamplingParams(temperature=s.temperature, max_tokens=s.max_new_tokens,
                                         stop_token_ids=stop, seed=sample_seed(s.seed, iteration, i, j)))
    return generate(model, tok, prompts, params)


def score(problems: list[Problem], samples: list[Sample], k: int, length_weight: float
          ) -> tuple[list[tuple[list[Sample], list[float]]], float]:
    """Per kept prompt (its k samples, their total rewards), and the mean pass rate over all prompts."""
    groups, passes = [], []
    for i, problem in enumerate(problems):
        group = samples[i * k:(i + 1) * k]
        rewards = [exact_match_reward(smp.text, problem.answer) for smp in group]
        passes.append(sum(rewards) / k)
        if not keep_prompt(rewards):
            continue
        if length_weight:
            bonus = length_rewards([smp.length for smp in group], [r > 0 for r in rewards])
            rewards = [r + length_weight * b for r, b in zip(rewards, bonus, strict=True)]
        groups.append((group, rewards))
    return groups, sum(passes) / len(passes)


def policy_optimizer(model: torch.nn.Module, s: RLSettings) -> HybridOptimizer:
    """A fresh optimizer (k1.5 resets its state every iteration), without weight decay.

    Why Muon with a small AdamW lr on embeddings, head and norms: a fresh AdamW's first steps are sign steps
    (m / sqrt(v) = +-1), so every weight moves by the full lr however weak its gradient; on RL's sparse,
    noisy gradients that is mostly noise, and on CPU AdamW at 5e-4 collapsed the policy while 1e-4 barely
    moved it. Muon's orthogonalized steps move hidden matrices along the batch's dominant directions instead
    (bench/results/training_rl_k15.json has the measured effect).
    """
    adamw_lr = s.embedding_lr if s.optimizer == "muon" else None
    return HybridOptimizer(model, s.lr, 0.0, s.optimizer, adamw_lr=adamw_lr)


def policy_update(model, groups: list[tuple[list[Sample], list[float]]], s: RLSettings) -> float:
    """pi_old := current policy, a fresh optimizer, then a few steps on the mean k1.5 loss over prompts."""
    flat = [smp for group, _ in groups for smp in group]
    rewards = torch.tensor([r for _, rs in groups for r in rs], device=s.device)
    with torch.no_grad():
        logp_old = sequence_logprobs(model, flat, s.device)
    optimizer = policy_optimizer(model, s)
    k, loss_value = s.samples_per_prompt, 0.0
    for _ in range(s.updates_per_iteration):
        logp = sequence_logprobs(model, flat, s.device)
        losses = [k15_loss(logp[g * k:(g + 1) * k], logp_old[g * k:(g + 1) * k], rewards[g * k:(g + 1) * k], s.tau)
                  for g in range(len(groups))]
        loss = torch.stack(losses).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss_value = loss.item()
    return loss_value


def train_problems(rng: random.Random, n: int, difficulty: int) -> list[Problem]:
    """RL prompts: the train split only (an evaluation operand pair is never trained on, here or in pretraining)."""
    return [make_problem(rng, difficulty, "train") for _ in range(n)]


def run_rl(s: RLSettings, on_checkpoint: Any = None) -> RLResult:
    """Run ``s.iterations`` k1.5 iterations from the latest checkpoint of ``s.init_from``; evaluate before/after."""
    ckpt.seed_everything(s.seed)
    model, config, tok, base_step = load_policy(s.init_from, s.device)
    eval_set = make_problems(s.seed + 1_000_003, s.eval_prompts, s.eval_difficulty, "eval")
    before = evaluate(model, tok, eval_set, s.max_new_tokens)
    curriculum = Curriculum(s.min_difficulty, s.max_difficulty, s.promote_at)
    rng, history = random.Random(f"rl:{s.seed}"), []
    bar = tqdm(range(s.iterations), disable=not s.progress, desc="rl")
    for it in bar:
        problems = train_problems(rng, s.prompts_per_iteration, curriculum.difficulty)
        samples = rollouts(model, tok, problems, s, it)
        weight = s.length_penalty_weight if it >= s.length_penalty_warmup else 0.0
        groups, pass_rate = score(problems, samples, s.samples_per_prompt, weight)
        loss = policy_update(model, groups, s) if groups else None  # nothing to learn from this batch
        entry = {"iteration": it + 1, "difficulty": curriculum.difficulty, "pass_rate": pass_rate,
                 "kept_prompts": len(groups), "loss": loss,
                 "mean_length": sum(x.length for x in samples) / len(samples)}
        curriculum.update(pass_rate)
        history.append(entry)
        bar.set_postfix(pass_rate=f"{pass_rate:.2f}", kept=len(groups), digits=entry["difficulty"])
    after = evaluate(model, tok, eval_set, s.max_new_tokens)
    result = RLResult(before=before, after=after, history=history)
    s.out_dir.mkdir(parents=True, exist_ok=True)
    ckpt.save_checkpoint(s.out_dir, s.iterations, model, None,
                         {"config": config.to_hf(), "history": history, "base_step": base_step})
    (s.out_dir / "tokenizer").mkdir(exist_ok=True)
    tok.save(str(s.out_dir / "tokenizer" / "tokenizer.json"))
    (s.out_dir / "metrics.json").write_text(json.dumps({"before": before, "after": after, "history": history},
                                                       indent=2))
    if on_checkpoint is not None:
        on_checkpoint(model, config, base_step + s.iterations, {"eval_before": before, "eval_after": after})
    return result
