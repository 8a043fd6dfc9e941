"""Kimi k1.5: the loss on a hand-computed case, the length penalty, the prompt filter, the curriculum, and one
tiny RL run end to end through crescent's engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from crescent.training.pretrain import pretrain
from crescent.training.rl import run_rl
from crescent.training.rl_loss import Curriculum, k15_loss, keep_prompt, length_rewards
from crescent.training.settings import PretrainSettings, RLSettings
from crescent.training.tasks import exact_match_reward, extract_answer, make_problems
from tests.unit.training.helpers import TINY


def test_k15_loss_hand_computed():
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    logp_old = torch.tensor([-1.5, -2.0])
    rewards = torch.tensor([1.0, 0.0])
    loss = k15_loss(logp, logp_old, rewards, tau=0.5)
    # baseline 0.5, advantages (0.5, -0.5), log-ratios (0.5, 0):
    # -(1/2) [(-1.0 * 0.5 - 0.25 * 0.5**2) + (-2.0 * -0.5 - 0)] = -0.21875
    assert loss.item() == pytest.approx(-0.21875)
    loss.backward()
    # d/dlogp_j = -(1/k) [adv_j - tau * log_ratio_j] = (-(0.5 - 0.25) / 2, -(-0.5) / 2)
    assert logp.grad.tolist() == pytest.approx([-0.125, 0.25])


def test_k15_loss_shape_mismatch_is_clear():
    with pytest.raises(ValueError, match=r"must all be \[k\]"):
        k15_loss(torch.zeros(3), torch.zeros(2), torch.zeros(3), tau=0.1)


def test_length_penalty_formula():
    # lambda = 0.5 - (len - min) / (max - min) = (0.5, 0, -0.5); the wrong middle one gets min(0, 0) = 0.
    assert length_rewards([10, 20, 30], [True, False, True]) == [0.5, 0.0, -0.5]
    # A short wrong answer is not rewarded: min(0, 0.5) = 0.
    assert length_rewards([10, 30], [False, True]) == [0.0, -0.5]
    assert length_rewards([7, 7, 7], [True, False, True]) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        length_rewards([1, 2], [True])


def test_prompt_filter_keeps_strictly_between_zero_and_one():
    assert keep_prompt([1.0, 0.0, 0.0])
    assert not keep_prompt([1.0, 1.0])
    assert not keep_prompt([0.0, 0.0])


def test_curriculum_promotes_after_sustained_success():
    c = Curriculum(1, 3, promote_at=0.8, window=2)
    assert c.update(0.9) == 1  # one good iteration is not enough
    assert c.update(0.95) == 2
    assert c.update(0.99) == 2
    assert c.update(0.99) == 3
    assert c.update(1.0) == c.update(1.0) == 3  # capped


def test_exact_match_reward_uses_last_integer():
    assert extract_answer("12 + 30 = 42") == 42
    assert extract_answer("7 - 9 = -2") == -2
    assert exact_match_reward("The answer is 42.", 42) == 1.0
    assert exact_match_reward("42 or 43", 42) == 0.0
    assert exact_match_reward("no idea", 42) == 0.0
    problems = make_problems(0, 50, 2, "eval")
    assert all(exact_match_reward(p.solution, p.answer) == 1.0 for p in problems)


def test_one_tiny_rl_run_end_to_end(tmp_path: Path):
    pretrain(PretrainSettings(out_dir=tmp_path / "pt", **TINY))
    s = RLSettings(init_from=tmp_path / "pt", out_dir=tmp_path / "rl", iterations=2, prompts_per_iteration=3,
                   samples_per_prompt=3, max_new_tokens=8, eval_prompts=4, length_penalty_warmup=1,
                   progress=False)
    published = []
    result = run_rl(s, on_checkpoint=lambda model, config, step, metrics: published.append((step, metrics)))
    assert len(result.history) == 2
    for entry in result.history:
        assert 0.0 <= entry["pass_rate"] <= 1.0 and entry["kept_prompts"] <= 3
        assert 0 < entry["mean_length"] <= 8
    assert set(result.before) == {"accuracy", "mean_length"}
    assert published == [(6 + 2, {"eval_before": result.before, "eval_after": result.after})]
    saved = json.loads((tmp_path / "rl" / "metrics.json").read_text())
    assert saved["after"] == result.after


def _tiny_policy():
    from crescent.training.pretrain import build_model, model_config
    from crescent.training.settings import ModelShapeSettings

    shape = ModelShapeSettings(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                               attention="full", full_layers=[])
    return build_model(model_config(shape, vocab_size=20, max_len=32, eos_id=2), seed=0, device="cpu")


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_policy_update_moves_probability_toward_rewarded_response(optimizer):
    from crescent.training.rl import policy_update
    from crescent.training.rollout import Sample, sequence_logprobs

    model = _tiny_policy()
    prompt = [3, 4, 5]
    group = [Sample(prompt, [7, 8, 2], "", 2), Sample(prompt, [9, 10, 2], "", 2)]
    s = RLSettings(samples_per_prompt=2, optimizer=optimizer, lr=1e-2, embedding_lr=1e-2, updates_per_iteration=3,
                   tau=0.01)
    before = sequence_logprobs(model, group, "cpu").detach()
    policy_update(model, [(group, [1.0, 0.0])], s)
    after = sequence_logprobs(model, group, "cpu").detach()
    assert after[0] > before[0] and after[1] < before[1]


def test_policy_optimizer_is_fresh_muon_on_matrices_with_its_own_embedding_lr():
    from crescent.training.rl import policy_optimizer

    model = _tiny_policy()
    opt = policy_optimizer(model, RLSettings(optimizer="muon", lr=2e-3, embedding_lr=1e-4))
    muon, adamw = opt.optimizers["muon"], opt.optimizers["adamw"]
    assert all(p.ndim == 2 for g in muon.param_groups for p in g["params"])
    assert {g["lr"] for g in muon.param_groups} == {2e-3} and {g["lr"] for g in adamw.param_groups} == {1e-4}
    assert not muon.state and not adamw.state  # k1.5 resets the optimizer state every iteration
    assert all(g["weight_decay"] == 0.0 for o in (muon, adamw) for g in o.param_groups)
    assert any(p is model.model.embed_tokens.weight for g in adamw.param_groups for p in g["params"])
    plain = policy_optimizer(model, RLSettings(optimizer="adamw", lr=3e-4))
    assert list(plain.optimizers) == ["adamw"] and plain.optimizers["adamw"].param_groups[0]["lr"] == 3e-4
