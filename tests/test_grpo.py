"""GRPO: the loss against its formula, split invariance, rollout rows, the generator on a LoRA
policy, and a short end-to-end run (SFT on the arithmetic task, then GRPO with routing replay,
interrupted and resumed)."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.config import Config, ConfigError, GRPOConfig
from moejax.finetune import grpo

B, T, V = 4, 9, 11


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, V, (B, T)).astype(np.int32)
    seg = np.ones((B, T), np.int32)
    seg[3, 6:] = 0  # padding
    loss_mask = np.zeros((B, T), np.int32)
    loss_mask[0, 3:] = 1
    loss_mask[1, 5:] = 1
    loss_mask[2, 2:4] = 1
    loss_mask[3, 4:6] = 1
    adv = np.repeat(rng.normal(size=(B, 1)), T, axis=1).astype(np.float32)
    old = (-rng.uniform(0.5, 3.0, (B, T))).astype(np.float32)
    return {
        "tokens": tokens,
        "segment_ids": seg,
        "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1)),
        "loss_mask": loss_mask,
        "advantages": adv,
        "old_logps": old,
    }


def _expected(logits, ref_logits, b, cfg: GRPOConfig):
    """The GRPO objective written out token by token in numpy."""
    lp = np.asarray(jax.nn.log_softmax(logits, -1))
    rp = np.asarray(jax.nn.log_softmax(ref_logits, -1))
    rows = []
    for i in range(B):
        terms = []
        for t in range(T - 1):
            if not (
                b["segment_ids"][i, t] > 0
                and b["segment_ids"][i, t + 1] == b["segment_ids"][i, t]
                and b["loss_mask"][i, t + 1]
            ):
                continue
            tok = b["tokens"][i, t + 1]
            ratio = np.exp(lp[i, t, tok] - b["old_logps"][i, t])
            a = b["advantages"][i, t]
            hi = cfg.epsilon_high or cfg.epsilon
            pg = -min(ratio * a, np.clip(ratio, 1 - cfg.epsilon, 1 + hi) * a)
            d = rp[i, t, tok] - lp[i, t, tok]
            terms.append(pg + cfg.beta * (np.exp(d) - d - 1))
        rows.append(terms)
    rows = [r for r in rows if r]
    if cfg.loss == "grpo":
        return np.mean([np.mean(r) for r in rows])
    if cfg.loss == "dr_grpo":
        return sum(sum(r) for r in rows) / (len(rows) * cfg.max_new_tokens)
    return sum(sum(r) for r in rows) / sum(len(r) for r in rows)


@pytest.mark.parametrize(
    "loss,eps_high,beta", [("grpo", 0.0, 0.04), ("dr_grpo", 0.0, 0.1), ("dapo", 0.28, 0.0)]
)
def test_loss_matches_the_formula_and_any_split(loss, eps_high, beta):
    cfg = GRPOConfig(loss=loss, epsilon_high=eps_high, beta=beta, max_new_tokens=7)
    b = _batch()
    logits = jax.random.normal(jax.random.key(0), (B, T, V)) * 2
    ref = jax.random.normal(jax.random.key(1), (B, T, V))
    whole = {k: jnp.asarray(v) for k, v in b.items()}
    norm = grpo.completion_counts(whole)
    got, metrics = grpo.grpo_share(logits, ref, whole, norm, cfg, cfg.max_new_tokens)
    np.testing.assert_allclose(float(got), _expected(logits, ref, b, cfg), rtol=1e-5, atol=1e-6)
    # shares of two halves (microbatches, data-parallel shards) divided by the global counts add up
    # to the whole
    halves = sum(
        float(
            grpo.grpo_share(
                logits[s],
                ref[s],
                {k: v[s] for k, v in whole.items()},
                norm,
                cfg,
                cfg.max_new_tokens,
            )[0]
        )
        for s in (slice(0, 2), slice(2, 4))
    )
    np.testing.assert_allclose(halves, float(got), rtol=1e-5, atol=1e-6)
    # clipping happens here: some ratios leave [1 - eps, 1 + eps] (old log-probs are far from the
    # policy's)
    assert 0 < float(metrics["grpo/clip_fraction"]) < 1


def test_gradient_of_an_unclipped_token_is_the_advantage_weighted_score():
    """With old = current log-probs (ratio 1) and beta 0, d loss / d logits = -A/|o| * d log p:
    REINFORCE."""
    cfg = GRPOConfig(loss="grpo", beta=0.0)
    b = {k: jnp.asarray(v) for k, v in _batch().items()}
    logits = jax.random.normal(jax.random.key(0), (B, T, V))
    from moejax.finetune.objectives import token_logps

    lp, valid = token_logps(logits, b)
    b["old_logps"] = jnp.where(valid, lp, 0.0)
    norm = grpo.completion_counts(b)
    g = jax.grad(lambda x: grpo.grpo_share(x, None, b, norm, cfg, 8)[0])(logits)
    n = valid.sum(1, keepdims=True)
    w = jnp.where(valid, -b["advantages"] / n / norm["rl_rows"], 0.0)
    want = jax.grad(lambda x: jnp.sum(w * token_logps(x, b)[0]))(logits)
    np.testing.assert_allclose(g, want, atol=1e-6)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="grpo.loss"):
        GRPOConfig(loss="ppo")
    with pytest.raises(ConfigError, match="grpo.group_size"):
        GRPOConfig(group_size=1)
    with pytest.raises(ConfigError, match="grpo.rewards"):
        GRPOConfig(rewards=("nope",), reward_weights=(1.0,))
    with pytest.raises(ConfigError, match="grpo.reward_weights"):
        GRPOConfig(reward_weights=(1.0,))


def test_generator_decodes_a_lora_policy_as_its_merged_weights():
    """GRPO samples from the train state as it is (adapters and frozen base, no merged copy kept):
    the same tokens and log-probabilities as the merged model."""
    from moejax.config import LoRAConfig
    from moejax.finetune import lora
    from moejax.infer import Generator, SamplingParams
    from moejax.model import Transformer
    from tests.test_infer import MLA, PROMPTS

    model = Transformer(MLA, rngs=nnx.Rngs(0))
    lora.apply(
        model, LoRAConfig(rank=4, targets=("attn/", "ffn/experts/", "ffn/shared/")), nnx.Rngs(1)
    )
    for _, m in nnx.iter_modules(model):  # non-zero adapters
        for name, v in list(vars(m).items()):
            if name.endswith("_lora_b"):
                v.set_value(0.3 * jax.random.normal(jax.random.key(len(name)), v.get_value().shape))
    params = [
        SamplingParams(temperature=1.0, max_new_tokens=6, seed=i) for i in range(len(PROMPTS))
    ]
    got = Generator(model, eos_ids=[]).generate(PROMPTS, params)
    want = Generator(lora.merge(model), eos_ids=[]).generate(PROMPTS, params)
    assert [o.tokens for o in got] == [o.tokens for o in want]
    np.testing.assert_allclose([o.logprobs for o in got], [o.logprobs for o in want], atol=1e-5)


def test_rollout_rows_line_up_tokens_masks_old_logps_and_routes():
    """A rollout row: prompt + completion (+ EOS when the row ended with it), the loss mask on the
    completion, old log-probs at the position that predicts each token, routes [positions, L * K]
    (-1 past the row)."""
    from types import SimpleNamespace

    from moejax.infer.generate import Completion
    from tests.helpers import tiny_config

    cfg = tiny_config()
    L, K = grpo._moe_layers(cfg), cfg.model.num_experts_per_tok
    r = grpo.Rollouts.__new__(grpo.Rollouts)
    r.cfg, r.tokenizer = cfg, SimpleNamespace(eos_id=2)

    def routes(n):
        return np.arange(L * n * K).reshape(L, n, K) % 4

    outs = [
        Completion([1, 7, 8], [9, 10], [-0.5, -0.25], "eos", eos_logprob=-0.125, routes=routes(6)),
        Completion([1, 7], [11, 12, 13], [-1.0, -2.0, -3.0], "length", routes=routes(5)),
    ]
    b = r._rows([o.prompt_tokens for o in outs], outs, np.array([1.5, -0.5], np.float32))
    assert b["tokens"][0, :6].tolist() == [1, 7, 8, 9, 10, 2] and b["tokens"][0, 6:].sum() == 0
    assert b["loss_mask"][0, :7].tolist() == [0, 0, 0, 1, 1, 1, 0]
    assert b["old_logps"][0, :6].tolist() == [0, 0, -0.5, -0.25, -0.125, 0]
    assert b["tokens"][1, :5].tolist() == [1, 7, 11, 12, 13] and b["loss_mask"][1, :6].tolist() == [
        0,
        0,
        1,
        1,
        1,
        0,
    ]
    assert b["old_logps"][1, :5].tolist() == [0, -1.0, -2.0, -3.0, 0]
    assert b["segment_ids"][1, :6].tolist() == [1, 1, 1, 1, 1, 0] and b["positions"][
        1, :5
    ].tolist() == list(range(5))
    np.testing.assert_array_equal(b["advantages"][:, 0], [1.5, -0.5])
    assert b["routes"].shape == (2, cfg.data.seq_len, L * K)
    np.testing.assert_array_equal(grpo.split_routes(b["routes"], K)[:, 0, :6], routes(6))
    assert (b["routes"][0, 6:] == -1).all() and (b["routes"][1, 5:] == -1).all()
    # the loss reads old log-probs where token_logps puts the policy's: the positions its valid mask
    # marks
    from moejax.trainer.step import shifted_targets

    _, valid = shifted_targets({k: jnp.asarray(v) for k, v in b.items()}, 1)
    assert ((b["old_logps"] != 0) == np.asarray(valid)).all()


def _fake_rollouts(dynamic_sampling, n_problems=40, P=4, G=4):
    """Rollouts whose draws are scripted: the group of prompt [1, 3 + i] scores all 1 when
    i % 3 == 0 (equal rewards), else [1, 0, 0, 0]."""
    import collections
    from types import SimpleNamespace

    from moejax.infer.generate import Completion
    from tests.helpers import tiny_config

    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=P * G, seed=3))
    r = grpo.Rollouts.__new__(grpo.Rollouts)
    r.cfg, r.tokenizer = cfg, SimpleNamespace(eos_id=2)
    r.g = GRPOConfig(group_size=G, dynamic_sampling=dynamic_sampling)
    r.prompts = [[1, 3 + i] for i in range(n_problems)]
    r.counts = collections.Counter()
    draws = []

    def draw(state, problems, seeds):
        draws.append(list(problems))
        prompts, outs, total = [], [], []
        for i in problems:
            for k in range(G):
                prompts.append(r.prompts[i])
                outs.append(Completion(r.prompts[i], [5 + i], [-0.5], "length"))
                total.append(1.0 if (r.prompts[i][1] - 3) % 3 == 0 or k == 0 else 0.0)
        total = np.array(total, np.float32)
        return prompts, outs, total, {"exact_answer": total}

    r._draw = draw
    return r, draws


def test_dynamic_sampling_replaces_equal_reward_groups():
    """DAPO's dynamic sampling: the batch's equal-reward groups are swapped for groups of further
    problems whose rewards differ; the rollout rates stay those of the round's own problems; with
    the extra draws spent, the first draw's equal-reward groups fill what is missing."""
    P, G = 4, 4
    plain, draws = _fake_rollouts(0)
    b0, m0 = plain._rollout(None, 5)
    assert len(draws) == 1
    first = draws[0]
    flat0 = sum(i % 3 == 0 for i in first)
    assert m0["rollout/zero_advantage_groups"] == flat0 / P and flat0 > 0  # the scripted round
    assert "rollout/resampled_groups" not in m0
    adv0 = b0["advantages"][:, 0].reshape(P, G)
    assert (np.ptp(adv0, axis=1) == 0).sum() == flat0

    dyn, draws = _fake_rollouts(3)
    b, m = dyn._rollout(None, 5)
    assert draws[0] == first and 2 <= len(draws) <= 4
    # the batch: the first draw's differing groups in order, then differing groups of later draws
    want = [i for i in first if i % 3] + [i for d in draws[1:] for i in d if i % 3]
    got = b["tokens"][:, 1].reshape(P, G)
    assert (got == got[:, :1]).all()
    assert [int(t) - 3 for t in got[:, 0]] == want[:P]
    adv = b["advantages"][:, 0].reshape(P, G)
    assert (np.ptp(adv, axis=1) > 0).all()
    assert m["rollout/resampled_groups"] == flat0 / P
    assert m["rollout/trained_zero_advantage_groups"] == 0
    assert len({i for d in draws for i in d}) == sum(map(len, draws))  # no problem drawn twice
    # the rates describe the round's own problems, as without dynamic sampling
    for k in ("rollout/reward", "rollout/zero_advantage_groups", "rollout/exact_answer"):
        assert m[k] == m0[k], k
    # the same round draws the same problems and seeds again (a resumed run repeats it)
    again, draws2 = _fake_rollouts(3)
    b2, _ = again._rollout(None, 5)
    assert draws2 == draws and (b2["tokens"] == b["tokens"]).all()

    # every problem's rewards are equal: the extra draws are spent and the first draw fills in
    allflat, draws = _fake_rollouts(2, n_problems=30)
    allflat.prompts = [[1, 3 + 3 * i] for i in range(10)]  # problems 0, 3, 6, ... only
    b, m = allflat._rollout(None, 0)
    assert len(draws) == 3 and m["rollout/resampled_groups"] == 0
    assert m["rollout/trained_zero_advantage_groups"] == 1.0 and (b["advantages"] == 0).all()
    with pytest.raises(ConfigError, match="grpo.dynamic_sampling"):
        GRPOConfig(dynamic_sampling=-1)


def _cfg(tmp_path, **grpo_over):
    from tests.helpers import tiny_config_dict

    cd = tiny_config_dict(str(tmp_path / "cache"))
    cd.grpo.max_value = 10
    cd.grpo.held_out = 16
    cd.grpo.max_new_tokens = 6
    cd.grpo.group_size = 4
    for k, v in grpo_over.items():
        cd.grpo[k] = v
    return cd


@pytest.mark.slow
def test_sft_then_grpo_with_replay_resumes_and_logs(tmp_path):
    """A tiny model: SFT on the arithmetic task from scratch, then GRPO (LoRA, routing replay, 2
    iterations per round) interrupted inside its first round and resumed: rollout and policy metrics
    logged, held-out reward evaluated; then full fine-tuning (KL to a reference copy) rewarded by a
    reward model trained on a few pairs."""
    from moejax.finetune import runner

    cd = _cfg(tmp_path)
    cd.sft.data = "arithmetic"
    cd.train.steps = 6
    runner.run(Config.from_dict(cd), str(tmp_path / "sft"), quiet=True)

    cd = _cfg(tmp_path, routing_replay=True, iterations=2)
    cd.base = str(tmp_path / "sft")
    cd.align.method = "grpo"
    with pytest.raises(ConfigError, match="model.router.bias_update_rate"):
        runner.resolve(Config.from_dict(cd))  # a moving bias would move the KL reference
    cd.model.router.bias_update_rate = 0.0
    cd.model.router.jitter = 0.01
    with pytest.raises(ConfigError, match="model.router.jitter"):
        runner.resolve(Config.from_dict(cd))  # the policy and its reference must route alike
    cd.model.router.jitter = 0.0
    for field, value in (("max_value", 12), ("ops", "+"), ("held_out", 20)):
        other = Config.from_dict(cd).to_dict()
        other["grpo"][field] = value  # held-out problems the SFT base trained on
        with pytest.raises(ConfigError, match=f"grpo.{field}"):
            runner.resolve(Config.from_dict(other))
    cd.lora.rank = 4
    cd.lora.targets = ("attn/", "ffn/experts/")
    cd.train.batch_size = 8
    cd.train.steps = 4
    cd.train.eval_every = 2
    cfg = Config.from_dict(cd)
    work = str(tmp_path / "grpo")
    runner.run(cfg, work, quiet=True, max_steps_this_run=1)  # stopped inside the first round
    out = runner.run(cfg, work, quiet=True)
    with open(os.path.join(work, "metrics.jsonl")) as f:
        lines = [json.loads(x) for x in f]
    steps = [x for x in lines if "loss" in x]
    assert [x["step"] for x in steps] == [1, 2, 3, 4]
    for x in steps:
        assert np.isfinite(x["loss"]) and "grpo/kl" in x
        # the weighted rule rewards (exact_answer 1.0, answer_format 0.1)
        assert x["rollout/reward"] == pytest.approx(
            x["rollout/exact_answer"] + 0.1 * x["rollout/answer_format"]
        )
    # the first step of a round is on-policy: the policy pass reproduces the sampler's
    # log-probabilities (and, the sampler's experts replayed, exactly its routing); the second one
    # has moved
    for x in steps[0::2]:
        assert x["grpo/logp_gap_to_sampler"] < 1e-3 and x["grpo/kl"] < 1e-3, x
        # the policy's own router agrees with the sampler's choices (measured: 0.0); off-policy
        # steps may differ (measured 0.185 at step 4)
        assert x["grpo/router_disagreement"] <= 0.02, x
    assert any(x["grpo/logp_gap_to_sampler"] > 1e-4 for x in steps[1::2])
    assert os.path.exists(os.path.join(work, "rollouts", "round.npz"))
    # the counted bad input reaches the log, carried across the interruption (a round's groups
    # counted once, though its first step ran twice)
    counted, P = 0.0, cfg.train.batch_size // cfg.grpo.group_size
    for x in steps:
        counted += x["rollout/zero_advantage_groups"] * P if x["step"] % 2 else 0.0
        assert x["counted/groups with equal rewards (zero advantage)"] == counted, x
    # the resumed run finished round 0 on the rollouts generated before the interruption (not
    # regenerated)
    assert steps[1]["rollout/reward"] == steps[0]["rollout/reward"]
    assert steps[1]["rollout/generate_seconds"] == steps[0]["rollout/generate_seconds"]
    # the held-out scores are rates over the 16 held-out problems (x eval_samples when sampled);
    # their arithmetic is tested on scripted completions below
    n = cfg.grpo.held_out
    assert out["val_reward"] * n == round(out["val_reward"] * n)
    assert out["val_reward_sampled"] * n * cfg.grpo.eval_samples == pytest.approx(
        round(out["val_reward_sampled"] * n * cfg.grpo.eval_samples)
    )
    assert any("val_reward" in x and x["step"] == 2 for x in lines)

    # a reward model (trained on a few pairs) as the only reward; full fine-tuning with the KL
    # reference
    from moejax.finetune import rewards

    pairs = tmp_path / "pairs.jsonl"
    with open(pairs, "w") as f:
        f.writelines(
            json.dumps(
                {"prompt": p["prompt"], "chosen": rewards.solution(p), "rejected": "no idea"}
            )
            + "\n"
            for p in rewards.arithmetic_split(10, "+-", 16)[0][:48]
        )
    rd = _cfg(tmp_path)
    rd.base = str(tmp_path / "sft")
    rd.sft.data = str(pairs)
    rd.align.method = "reward"
    rd.data.seq_len = 128  # a pair (two prompts and answers) in one row
    rd.train.steps = 2
    runner.run(Config.from_dict(rd), str(tmp_path / "rm"), quiet=True)
    # the reward model must be a reward-model run on the policy's tokens
    tok_file = runner.base_tokenizer(str(tmp_path / "sft"))[0]
    other = tmp_path / "other.model"
    other.write_bytes(b"another tokenizer")
    rm_cfg = Config.from_dict(cd)
    rm_cfg = dataclasses.replace(
        rm_cfg, grpo=dataclasses.replace(rm_cfg.grpo, reward_model=str(tmp_path / "rm"))
    )
    runner._check_reward_model(rm_cfg, tok_file)
    with pytest.raises(ConfigError, match="reads other tokens than the policy"):
        runner._check_reward_model(rm_cfg, str(other))
    for bad, why in ((tmp_path / "sft", "not a reward-model run"), (tmp_path, "not a training")):
        with pytest.raises(ConfigError, match=why):
            runner._check_reward_model(
                dataclasses.replace(
                    rm_cfg, grpo=dataclasses.replace(rm_cfg.grpo, reward_model=str(bad))
                ),
                tok_file,
            )
    cd.lora.rank = 0
    cd.grpo.routing_replay = False
    cd.grpo.loss = "dr_grpo"
    cd.grpo.rewards = ()
    cd.grpo.reward_weights = ()
    cd.grpo.reward_model = str(tmp_path / "rm")
    cd.train.steps = 2
    cd.train.eval_every = 0
    out = runner.run(Config.from_dict(cd), str(tmp_path / "full"), quiet=True)
    assert np.isfinite(out["loss"]) and "val_reward" in out
    assert np.isfinite(out["rollout/reward_model"]) and out["rollout/reward"] == pytest.approx(
        out["rollout/reward_model"]
    )


class _CharTokenizer:
    """Enough of a tokenizer for Rollouts: one id per character."""

    bos_id, eos_id = 1, 2

    def encode(self, text):
        return [3 + ord(c) % 50 for c in text]


def test_bad_task_rows_and_reward_model_non_numbers_are_counted_and_logged(tmp_path, monkeypatch):
    """A task file's unusable rows and a reward model's non-finite scores are counted (never a
    crash or a NaN advantage), and the counts are what `metrics()` hands the training log."""
    from types import SimpleNamespace

    from moejax.infer.generate import Completion

    task = tmp_path / "task.jsonl"
    good = [{"prompt": f"What is {i} + 1?", "answer": i + 1} for i in range(10)]
    bad = ["not json {", json.dumps([1, 2]), json.dumps({"prompt": "no answer"})]
    bad += [json.dumps({"prompt": "x", "answer": True}), json.dumps({"prompt": 3, "answer": "3"})]
    task.write_text(
        "\n".join([json.dumps(r) for r in good[:5]] + bad + [json.dumps(r) for r in good[5:]])
    )
    cd = _cfg(tmp_path, task=str(task), held_out=2, reward_model="rm", reward_model_weight=1.0)
    cd.train.batch_size = 8
    cd.data.seq_len = 512
    scores = iter(
        [np.array([0.5, np.nan, 1.0, np.inf, -1.0, 0.0, 2.0, 0.1], np.float32), RuntimeError()]
    )

    def scorer(prompts, completions):  # a reward model: non-numbers, then a failure
        assert len(prompts) == len(completions) == 8
        s = next(scores)
        if isinstance(s, Exception):
            raise s
        return s

    monkeypatch.setattr(grpo, "RewardModelScorer", lambda workdir, seq_len: scorer)
    r = grpo.Rollouts(Config.from_dict(cd), _CharTokenizer(), None)
    assert [p["answer"] for p in r.held_out] == ["9", "10"] and len(r.train) == 8
    assert r.counts == {
        "task rows skipped: not JSON": 1,
        "task rows skipped: not a JSON object": 1,
        "task rows skipped: no string prompt and answer": 3,
    }

    texts = {}  # prompt tokens -> the scripted completion: right for half the problems

    def generate(prompts, params):
        out = []
        for j, p in enumerate(prompts):
            i = next(k for k, e in enumerate(r.prompts) if e == p)
            ans = r.train[i]["answer"] if i % 2 == 0 or j % 4 == 0 else "0"
            texts[tuple(p)] = f"#### {ans}"
            out.append(Completion(p, [7, 8], [-0.1, -0.2], "eos", f"#### {ans}", eos_logprob=-0.3))
        return out

    r._generator = lambda state: SimpleNamespace(generate=generate)
    batch, m = r._rollout(None, 0)
    assert np.isfinite(batch["advantages"]).all() and m["rollout/reward_model"] == pytest.approx(
        np.mean([0.5, 0, 1.0, 0, -1.0, 0.0, 2.0, 0.1])
    )
    batch, m = r._rollout(None, 1)  # the reward model raises: every completion scores 0
    assert m["rollout/reward_model"] == 0 and np.isfinite(batch["advantages"]).all()
    r._metrics = m
    logged = r.metrics()
    assert logged["counted/reward_model returned a non-number"] == 2.0
    assert logged["counted/reward_model raised RuntimeError"] == 8.0
    assert logged["counted/task rows skipped: no string prompt and answer"] == 3.0
    assert logged["rollout/reward"] == m["rollout/reward"]
    # a checkpoint keeps the counts; a resumed run logs them again
    again = grpo.Rollouts(Config.from_dict(cd), _CharTokenizer(), None)
    again.restore(json.loads(json.dumps(r.state())))
    assert again.counts == r.counts
    # only the latest round's rollouts are kept: checkpoints must fall on round boundaries
    cd.grpo.iterations, cd.train.ckpt_every = 2, 5
    with pytest.raises(ConfigError, match="train.ckpt_every=5 is not a multiple of grpo.iter"):
        grpo.Rollouts(Config.from_dict(cd), _CharTokenizer(), None)


def test_held_out_evaluation_scores_greedy_and_sampled_completions(tmp_path):
    """val_reward is the greedy completions' exact-answer rate, val_format their format rate, and
    val_reward_sampled the mean over grpo.eval_samples sampled completions per problem, at the
    rollout temperature with the same seeds at every evaluation."""
    from types import SimpleNamespace

    from moejax.infer.generate import Completion

    cd = _cfg(tmp_path, held_out=4, eval_samples=3, temperature=0.7)
    cd.train.batch_size = 4
    cd.data.seq_len = 512
    r = grpo.Rollouts(Config.from_dict(cd), _CharTokenizer(), None)
    answers = [p["answer"] for p in r.held_out]
    calls = []

    def generate(prompts, params):
        calls.append([(p.temperature, p.seed) for p in params])
        out = []
        for p, sp in zip(prompts, params):
            i = r.eval_prompts.index(p)
            if sp.temperature == 0:  # greedy: problem 0 right, 1 right but unformatted, 2-3 wrong
                text = [f"#### {answers[0]}", f"#### {answers[1]} ok", "#### x", "no"][i]
            else:  # sampled: right when seed % 3 == 0
                text = f"#### {answers[i] if sp.seed % 3 == 0 else 'x'}"
            out.append(Completion(p, [7], [-0.1], "length", text))
        return out

    r._generator = lambda state: SimpleNamespace(generate=generate)
    got = r.evaluate(None)
    seeds = [s for c in calls for t, s in c if t > 0]
    assert len(seeds) == 12 and all(t in (0.0, 0.7) for c in calls for t, _ in c)
    assert got["val_reward"] == 0.5 and got["val_format"] == 0.25
    assert got["val_reward_sampled"] == pytest.approx(np.mean([s % 3 == 0 for s in seeds]))
    assert 0 < got["val_reward_sampled"] < 1
    first = list(calls)
    calls.clear()
    assert r.evaluate(None) == got and calls == first  # the same seeds every evaluation
