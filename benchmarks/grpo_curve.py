"""GRPO reward curves with and without routing replay, side by side, from the same SFT'd base.

  python -m benchmarks.grpo_curve [--base runs/sft_arithmetic] [--steps 60] [--out /tmp/grpo_curve]

Runs experiments/grpo.py twice (routing_replay False, then True; same seeds, same rollout prompts)
and prints, per evaluation point, the held-out exact-match reward (greedy), and per window of steps
the rollouts' exact-match rate, the router disagreement with the sampler (the share of the sampler's
expert assignments the policy pass's router would change) and the mean |log pi - log pi_sampler|
over completion tokens. Then two short runs in bfloat16 compute with one step per round (on-policy:
every difference between the policy pass and the sampler is numerics and routing), without and with
replay. The runs go one after the other (never at once).

  python -m benchmarks.grpo_curve --errors WORKDIR[@STEP] [...] [--max_value 100 --ops +]

prints, instead, each workdir's held-out completions by outcome (exact, the first operand copied,
other), sampled at temperature 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time


def _run(base: str, steps: int, replay: bool, workdir: str, extra: list[str]) -> float:
    import ml_collections  # noqa: F401  (the config module needs it)

    from moejax.config import Config
    from moejax.experiment import load_config_file
    from moejax.finetune import runner

    cd = load_config_file(
        os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments", "grpo.py"
        )
    )
    cd.base = base
    cd.train.steps = steps
    cd.grpo.routing_replay = replay
    for item in extra:
        key, value = item.split("=", 1)
        section, field = key.split(".", 1)
        cd[section][field] = type(cd[section][field])(json.loads(value))
    shutil.rmtree(workdir, ignore_errors=True)
    t0 = time.perf_counter()
    runner.run(Config.from_dict(cd), workdir, quiet=True)
    return time.perf_counter() - t0


def _curves(workdir: str, window: int):
    evals, steps = [], []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            d = json.loads(line)
            if "val_reward" in d:
                evals.append(
                    (d["step"], d["val_reward"], d.get("val_reward_sampled", float("nan")))
                )
            elif "loss" in d:
                steps.append(d)

    def mean(w, k):  # (a dense model logs no router terms: nan)
        return sum(x.get(k, float("nan")) for x in w) / len(w)

    windows = []
    for i in range(0, len(steps), window):
        w = steps[i : i + window]
        windows.append(
            (
                w[0]["step"],
                w[-1]["step"],
                mean(w, "rollout/exact_answer"),
                mean(w, "grpo/router_disagreement"),
                mean(w, "grpo/logp_gap_to_sampler"),
                mean(w, "grpo/kl"),
            )
        )
    return evals, windows


def error_breakdown(
    workdir: str, max_value: int, ops: str, held_out: int, samples: int = 4
) -> dict:
    """Held-out completions of a workdir's model sampled at temperature 1 (`samples` per problem,
    the evaluation's seeds), by outcome: exact, the first operand copied (the slip
    `grpo.demo_copy` plants in SFT data) or another wrong answer. Shares of all completions."""
    import collections

    from moejax.finetune import rewards
    from moejax.finetune.grpo import encode_prompt
    from moejax.infer import Generator, SamplingParams
    from moejax.infer.load import load

    _, problems = rewards.arithmetic_split(max_value, ops, held_out)
    model, tok = load(workdir)
    gen = Generator(model, tok, eos_ids=[tok.eos_id])

    prompts = [encode_prompt(tok, p["prompt"]) for p in problems for _ in range(samples)]
    params = [
        SamplingParams(temperature=1.0, max_new_tokens=12, seed=1_000_000 + j)
        for j in range(len(prompts))
    ]
    outs = []
    for i in range(0, len(prompts), 128):
        outs += gen.generate(prompts[i : i + 128], params[i : i + 128])
    counts = collections.Counter()
    for j, o in enumerate(outs):
        p = problems[j // samples]
        first = rewards.PROBLEM.match(p["prompt"]).group(1)
        # compared as the reward compares them: numbers ("07" is 7)
        exact, copied = (rewards.exact_answer(o.text, a) > 0 for a in (p["answer"], first))
        counts["exact" if exact else "copied" if copied else "other"] += 1
    return {k: v / len(outs) for k, v in sorted(counts.items())}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--base", default="runs/sft_arithmetic")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--out", default="/tmp/grpo_curve")
    p.add_argument("--window", type=int, default=5, help="logged steps averaged per row")
    p.add_argument(
        "--set", action="append", default=[], help="section.field=JSON value (e.g. optim.lr=1e-4)"
    )
    p.add_argument(
        "--bf16_steps",
        type=int,
        default=6,
        help="on-policy steps of the bfloat16 mismatch check (0: skip)",
    )
    p.add_argument(
        "--errors",
        nargs="+",
        default=None,
        help="only print the held-out error breakdown of these workdirs (no GRPO run)",
    )
    p.add_argument("--max_value", type=int, default=100, help="with --errors: grpo.max_value")
    p.add_argument("--ops", default="+", help="with --errors: grpo.ops")
    p.add_argument("--held_out", type=int, default=256, help="with --errors: grpo.held_out")
    a = p.parse_args(argv)
    if a.errors:
        for w in a.errors:
            shares = error_breakdown(w, a.max_value, a.ops, a.held_out)
            print(w, ", ".join(f"{k} {v:.3f}" for k, v in shares.items()))
        return
    times, curves = {}, {}
    for replay in (False, True):
        name = "replay" if replay else "no_replay"
        times[name] = _run(a.base, a.steps, replay, os.path.join(a.out, name), a.set)
        curves[name] = _curves(os.path.join(a.out, name), a.window)
    print(
        f"GRPO from {a.base}, {a.steps} steps; wall: no replay {times['no_replay']:.0f}s, "
        f"replay {times['replay']:.0f}s"
    )
    print(
        "\nheld-out exact match, greedy and sampled (mean of grpo.eval_samples at the rollout "
        "temperature):"
    )
    print(
        "| step | greedy, no replay | greedy, replay | sampled, no replay | sampled, replay "
        "|\n|---:|---:|---:|---:|---:|"
    )
    for (s, g0, s0), (_, g1, s1) in zip(curves["no_replay"][0], curves["replay"][0]):
        print(f"| {s} | {g0:.3f} | {g1:.3f} | {s0:.3f} | {s1:.3f} |")
    print("\nrollouts (means over logged steps):")
    print(
        "| steps | exact (no replay) | exact (replay) | router disagreement (no replay) | (replay) "
        "| logp gap (no replay) | (replay) |\n|---|---:|---:|---:|---:|---:|---:|"
    )
    for w0, w1 in zip(curves["no_replay"][1], curves["replay"][1]):
        print(
            f"| {w0[0]}-{w0[1]} | {w0[2]:.3f} | {w1[2]:.3f} | {w0[3]:.4f} | {w1[3]:.4f} | "
            f"{w0[4]:.4f} | {w1[4]:.4f} |"
        )
    # the sampler/trainer mismatch in bfloat16 compute, on-policy (one step per round): what replay
    # removes
    mismatch = {}
    if a.bf16_steps:
        for replay in (False, True):
            name = f"bf16_{'replay' if replay else 'no_replay'}"
            _run(
                a.base,
                a.bf16_steps,
                replay,
                os.path.join(a.out, name),
                a.set
                + ['model.compute_dtype="bfloat16"', "grpo.iterations=1", "train.eval_every=0"],
            )
            w = _curves(os.path.join(a.out, name), a.bf16_steps)[1][0]
            mismatch[name] = {"router_disagreement": w[3], "logp_gap": w[4]}
        print(
            f"\nbfloat16 compute, on-policy steps (1 per round), means over {a.bf16_steps} steps:"
        )
        print("| | router disagreement | mean abs(log pi - log pi_sampler) |\n|---|---:|---:|")
        for name, m in mismatch.items():
            print(f"| {name} | {m['router_disagreement']:.4f} | {m['logp_gap']:.4f} |")
    with open(os.path.join(a.out, "curves.json"), "w") as f:
        json.dump({"times": times, "curves": curves, "bf16": mismatch}, f)


if __name__ == "__main__":
    main()
