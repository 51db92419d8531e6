"""Run in a process with 8 CPU devices (test_infer.py): generation with a model whose parameters are
sharded over fsdp=2 x expert=4 (the experts run expert-parallel) gives the single-device tokens,
plain and speculative, for a batch the batch axes split (8 rows) and one they do not (3 rows:
GSPMD's dropless path); the parameters stay sharded. The same on fsdp=2 x expert=2 x context=2
(the generator attends in natural order on a layout whose context axis would split the sequence).
Prints one JSON line."""

from __future__ import annotations

import json
import sys

import jax
import numpy as np
from flax import nnx

from moejax import sharding
from moejax.config import MeshConfig
from moejax.convert.load import target_shardings
from moejax.infer import Generator, SamplingParams
from moejax.model import Transformer
from tests.test_infer import MLA


def main():
    assert jax.device_count() == 8, jax.devices()
    cfg = MLA.replace(n_routed_experts=8)
    one = Transformer(cfg, rngs=nnx.Rngs(0))
    out = {}
    for shape, batches in (
        (MeshConfig(fsdp=2, expert=4), (8, 3)),
        (MeshConfig(fsdp=2, expert=2, context=2), (8,)),
    ):
        run(cfg, one, shape, batches, out)
    print(json.dumps(out))


def run(cfg, one, shape, batches, out):
    mesh, rules = sharding.make_mesh(shape), sharding.rules_for(shape)
    graphdef, abstract = nnx.split(
        nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0), mesh=mesh, rules=rules))
    )
    _, _, shardings = target_shardings(abstract, mesh, rules)
    sharded = nnx.merge(graphdef, jax.device_put(nnx.state(one), shardings))
    rng = np.random.default_rng(0)
    for B in batches:
        prompts = [
            rng.integers(1, cfg.vocab_size, size=int(n)).tolist()
            for n in rng.integers(2, 12, size=B)
        ]
        params = SamplingParams(max_new_tokens=8)
        want = [o.tokens for o in Generator(one, eos_ids=[]).generate(prompts, params)]
        gen = Generator(sharded, eos_ids=[])
        got = [o.tokens for o in gen.generate(prompts, params)]
        spec = [o.tokens for o in gen.generate(prompts, params, speculative=True)]
        w = gen.state["segments"][1]["ffn"]["w_gate_up"].get_value()
        out[f"{'context ' if shape.context > 1 else ''}{B}"] = {
            "equal": got == want,
            "speculative_equal": spec == want,
            "expert_shard_rows": w.addressable_shards[0].data.shape[1],
            "experts": w.shape[1],
            "expert_ways": shape.expert,
        }


if __name__ == "__main__":
    sys.exit(main())
