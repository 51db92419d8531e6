"""DPO on arithmetic preference pairs: the policy's own held-out preference accuracy before and
after.

  python -m benchmarks.dpo_arithmetic --base runs/sft_arithmetic [--steps 40] [--beta 0.1]
      [--lora_rank 0] [--out /tmp/dpo_arith]

Pairs come from the built-in task of the base's SFT run (experiments/sft_arithmetic.py: the same
max_value, ops and held-out split). Each training problem prefers its answer ('#### 57') over a near
miss: the answer +- 1 or +- 10, a slip in the units digit or in the carry. experiments/dpo.py (full
weights, `--lora_rank` to change) trains on those pairs. The accuracy measured is the policy's own:
the share of held-out pairs, built the same way from problems neither SFT nor DPO saw, whose chosen
answer has the higher log-probability under the model (summed over the answer's tokens after the
chat-rendered prompt). The run's own `val_accuracy` (DPO's implicit reward, which ties every pair
at step 0) is printed beside it, and the same measure on the held-out pairs: the share whose
margin grew.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time


def near_miss(answer: str, rng: random.Random) -> str:
    a = int(answer)
    d = rng.choice((-10, -1, 1, 10))
    return str(a - d if a + d < 0 else a + d)


def pairs(problems: list[dict], seed: int) -> list[dict]:
    from moejax.finetune import rewards

    rng = random.Random(seed)
    return [
        {
            "prompt": p["prompt"],
            "chosen": rewards.solution(p),
            "rejected": rewards.solution(dict(p, answer=near_miss(p["answer"], rng))),
        }
        for p in problems
    ]


def margins(path: str, rows: list[dict]):
    """Per row, log p(chosen) - log p(rejected) under the model at `path` (nats, float [n])."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from moejax.finetune.grpo import encode_prompt
    from moejax.infer.load import load

    model, tok = load(path)
    seqs, spans = [], []
    for r in rows:
        prompt = encode_prompt(tok, r["prompt"])
        for completion in (r["chosen"], r["rejected"]):
            answer = list(tok.encode(completion))
            seqs.append(prompt + answer)
            spans.append((len(prompt), len(prompt) + len(answer)))
    T = max(len(s) for s in seqs)
    tokens = np.zeros((len(seqs), T), np.int32)
    seg = np.zeros((len(seqs), T), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)], seg[i, : len(s)] = s, 1
    pos = np.broadcast_to(np.arange(T, dtype=np.int32), tokens.shape)

    @jax.jit
    def logps(m, tokens, pos, seg):
        lp = jax.nn.log_softmax(m(tokens, pos, seg)[0][:, :-1].astype(jnp.float32), axis=-1)
        return jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]  # [N, T - 1]

    lp = np.asarray(logps(model, tokens, pos, seg))
    # token t is predicted at position t - 1
    total = np.array([lp[i, a - 1 : b - 1].sum() for i, (a, b) in enumerate(spans)])
    return total[0::2] - total[1::2]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--base", default="runs/sft_arithmetic")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--lora_rank", type=int, default=0)
    p.add_argument("--beta", type=float, default=0.1, help="align.beta")
    p.add_argument("--out", default="/tmp/dpo_arith")
    a = p.parse_args(argv)

    import ml_collections  # noqa: F401  (the config module needs it)

    from moejax.config import Config
    from moejax.experiment import load_config_file
    from moejax.finetune import rewards, runner
    from moejax.infer.load import workdir_config

    g = workdir_config(a.base).grpo
    train, held = rewards.arithmetic_split(g.max_value, g.ops, g.held_out)
    os.makedirs(a.out, exist_ok=True)
    data = os.path.join(a.out, "pairs.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in pairs(train, seed=0))
    held_pairs = pairs(held, seed=1)

    cd = load_config_file(
        os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "dpo.py"
        )
    )
    cd.base, cd.sft.data = a.base, data
    cd.lora.rank = a.lora_rank
    cd.align.beta = a.beta
    cd.train.steps = a.steps
    cd.train.num_samples = 0
    work = os.path.join(a.out, "dpo")
    t0 = time.perf_counter()
    last = runner.run(Config.from_dict(cd), work, quiet=True)
    wall = time.perf_counter() - t0
    before, after = margins(a.base, held_pairs), margins(work, held_pairs)
    print(
        f"DPO on {len(train)} arithmetic pairs from {a.base}, {a.steps} steps, "
        f"lora rank {a.lora_rank}, beta {a.beta}: {wall:.0f} s; run's val_accuracy (implicit "
        f"reward) {last.get('val_accuracy', float('nan')):.3f}"
    )
    print(
        f"held-out pairs ({len(held_pairs)} problems never trained on), the policy's own ranking:"
    )
    print("| model | preference accuracy | mean log-prob margin (nats) |\n|---|---:|---:|")
    for name, m in (("base", before), ("after DPO", after)):
        print(f"| {name} | {(m > 0).mean():.3f} | {m.mean():.2f} |")
    print(
        f"held-out pairs whose margin grew (DPO's implicit-reward accuracy on them): "
        f"{(after > before).mean():.3f}"
    )


if __name__ == "__main__":
    main()
