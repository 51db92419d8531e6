"""Plan a run before renting the chips: parameters, FLOPs, memory per device by component, time and
cost.

    python -m moejax.plan --config experiments/deepseek_v3.py --topology v5p-1024 \\
        --config.mesh.expert=32 --config.train.batch_size=1024 --tokens 14.8e12 --mfu 0.4

Nothing is compiled or allocated: parameter and optimizer bytes are exact (the abstract train state
of moejax.trainer.setup, sharded by the config's mesh and rules; a mesh, rule or batch size the run
would refuse is refused here too), activations are an estimate from the shapes under the remat
policy (see `activation_bytes`), and time and cost follow from FLOPs per token at an assumed MFU and
price per chip-hour. `python -m moejax.compile` gives the compiler's own figure to check it against.
"""

from __future__ import annotations

import math
import os
import sys

import jax
import jax.numpy as jnp

from moejax.config import Config

GiB = 1024**3


def _shard_bytes(tree) -> int:
    """Per-device bytes of a tree of sharded ShapeDtypeStructs."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
    )


def gathered_weight_bytes(params, mesh_shape, cfg: Config, grads: bool = True) -> int:
    """Weights as the matmuls read them, per device, with their float32 gradients before the
    reduce-scatter: the FSDP axes (those of the 'batch' rule) are gathered, the expert and tensor
    splits stay (grads=False: frozen weights, gathered without gradients). Counted: the largest
    scanned layer body's (one layer's backward pass holds them beside its activations), and the
    embedding and output head, whose whole gathered tables and gradients the compiled V2-Lite and
    V3 steps hold at once (XLA's buffer reports)."""
    from moejax import sharding

    shape_only = type("S", (), {"shape": mesh_shape})
    rules = sharding.rules_for(cfg.mesh)
    gathered = set(sharding.batch_axes(shape_only, rules))
    kept = set(sharding.expert_axes(shape_only, rules))
    cb = jnp.dtype(cfg.model.compute_dtype).itemsize

    def size(x, stacked: bool) -> float:
        if not hasattr(x, "sharding") or x.ndim < 1 + stacked:
            return 0.0
        spec = tuple(x.sharding.spec) + (None,) * (x.ndim - len(x.sharding.spec))
        shape, spec = (x.shape[1:], spec[1:]) if stacked else (x.shape, spec)
        split = 1
        for i, entry in enumerate(spec):
            axes = () if entry is None else (entry if isinstance(entry, tuple) else (entry,))
            expert_dim = stacked and i == 0 and shape[0] == cfg.model.n_routed_experts
            split *= math.prod(
                mesh_shape[a] for a in axes if a not in gathered or (expert_dim and a in kept)
            )
        return math.prod(shape) / split * (cb + (4 if grads else 0))

    segments = params["segments"] if "segments" in params else {}
    segments = segments.values() if hasattr(segments, "values") else segments
    body = max((sum(size(x, True) for x in jax.tree.leaves(seg)) for seg in segments), default=0.0)
    tables = sum(
        size(x, False)
        for k in ("embed", "lm_head")
        if k in params
        for x in jax.tree.leaves(params[k])
    )
    return int(body + tables)


def attention_score_bytes(ex, B: float, H: float, T: int) -> float:
    """What attention keeps per layer beyond its inputs and output, per device: the reference's
    float32 probabilities [B, H, T, T]; the flash-style backends (blockwise, splash, Triton, cuDNN;
    'auto' picks one on every platform) keep a float32 log-sum-exp [B, H, T] (their one block pair's
    transient scores are too small to count against the activations)."""
    if ex.attention_impl == "reference":
        return B * H * T * T * 4
    return B * H * T * 4


def _v4_layer_bytes(
    m, ex, layer_type: str, B, T: int, H, tp: int, cb: int, scores_only=False
) -> float:
    """One DeepSeek-V4 layer's activations per device (model/v4.py). Attention scores: in the
    reference form the float32 logits, exponentials and probabilities over [T, T + entries] per
    head and the key mask (on CSA also the indexer's ReLU inputs [T, Hi, entries]); in the blocked
    training form the same for one query block at a time over its window rows and the entries it
    reads (HCA: all, CSA: index_topk gathered), plus the block's indexer scores. Besides: queries,
    outputs and their gradients over the wide head; the compressors' raw float32 projections and
    entries; the indexer's float32 queries; the grouped output projection; the hyper-connections'
    float32 streams."""
    rate = m.compress_rate(layer_type)
    entries = T // rate if rate else 0
    csa = layer_type == "compressed_sparse_attention"
    Hi = m.index_n_heads
    if ex.attention_impl == "reference":
        scores = B * T * (T + entries) * (H * 4 * 3 + 1)
        if csa:
            scores += B * T * entries * (Hi * 4 * 2 + 4 * 3)
    else:
        block = ex.attention_block or 128
        bq = min(block, T)  # (a last partial block is padded)
        read = min(m.index_topk, entries) if csa else entries
        scores = B * bq * (bq + m.sliding_window - 1 + read) * (H * 4 * 3 + 1)
        if csa:
            scores += B * bq * (entries * (Hi * 4 * 2 + 4 * 3) + read * m.head_dim * cb)
    if scores_only:
        return scores
    tokens, Hd, D = B * T, m.head_dim, m.hidden_size
    c = 2 if csa else 1
    raw = (2 * c * Hd if rate else 0) + (2 * 2 * m.index_head_dim if csa else 0)
    proj = tokens * ((m.q_lora_rank + Hd) * cb + raw * 4 + m.o_groups * m.o_lora_rank / tp * cb)
    proj += B * entries * (Hd + (m.index_head_dim if csa else 0)) * 4
    if csa:  # the indexer's queries and head weights, float32
        proj += tokens * Hi * (m.index_head_dim + 1) * 4
    streams = 2 * tokens * m.hc_mult * D * 4 * 2  # two sublayers: normed streams and the mix
    return tokens * H * 4 * Hd * cb + proj + scores + streams + 2 * tokens * D * cb + tokens * D * 8


def activation_bytes(cfg: Config, mesh_shape) -> dict[str, int]:
    """Estimated activation memory per device at the peak of the backward pass.

    Per layer the forward keeps (remat 'none') the attention inputs and outputs, the attention's own
    residuals (attention_score_bytes), the MoE dispatch rows (k per token, expert-parallel send and
    receive buffers) and the SwiGLU pre-activations; with remat 'full' only each layer's input (in
    the compute dtype) is kept and one layer's set is rebuilt (plus its gradients, counted as the
    set again) during its backward pass. Logits are float32 [B, T, V] per output head (main + MTP);
    their gradient takes the same buffer.
    """
    from moejax import sharding
    from moejax.model import moe_ep

    m, ex = cfg.model, cfg.execution
    shape_only = type("S", (), {"shape": mesh_shape})  # the rule helpers read only mesh.shape
    rules = sharding.rules_for(cfg.mesh)
    n_batch = math.prod(mesh_shape[a] for a in sharding.batch_axes(shape_only, rules))
    tp = mesh_shape.get("tensor", 1)
    n_ep = math.prod(mesh_shape[a] for a in sharding.expert_axes(shape_only, rules))
    cb = jnp.dtype(m.compute_dtype).itemsize
    B = cfg.train.batch_size / max(1, n_batch) / cfg.train.microbatches
    T, D, H = cfg.data.seq_len, m.hidden_size, m.num_heads / tp
    # context parallelism: each device holds T / n_seq positions (kernels/attention/context.py)
    n_seq = math.prod(mesh_shape[a] for a in sharding.sequence_axes(shape_only, rules))
    n_seq = n_seq if T % (2 * n_seq) == 0 else 1
    tokens = B * T / n_seq
    if m.attention_type == "mla":
        qk, v = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
        proj = tokens * ((m.q_lora_rank or 0) + m.kv_lora_rank + m.qk_rope_head_dim) * cb
        kv_heads = H
    else:
        qk = v = m.head_dim or D // m.num_heads
        proj = 0
        kv_heads = max(1.0, m.kv_heads / tp)
    scores = attention_score_bytes(ex, B, H, T / n_seq)  # each device's queries ...
    if ex.attention_impl == "reference":
        scores *= n_seq  # ... over every key
    mqa = not (ex.attention_impl == "reference" or ex.fp8 or cfg.lora.rank)  # MLA._sparse_mqa
    if m.index_topk and m.dsa_stage == "sparse" and mqa:
        # DeepSeek Sparse Attention, gathered (dsa.sparse_mla): the absorbed queries [B, T, H,
        # R + Hr] and the indexer's queries and head weights (float32) are kept; one query block
        # at a time holds the indexer's ReLU inputs and their gradient [B, bq, Hi, S], its scores
        # and key mask [B, bq, S], the gathered latents [B, bq, k, R + Hr] and the logits /
        # probabilities / their gradient [B, bq, H, k]
        bq, k = min(ex.attention_block or 128, T), min(m.index_topk, T)
        C = m.kv_lora_rank + m.qk_rope_head_dim
        scores = tokens * (H * C * cb + m.index_n_heads * (m.index_head_dim + 1) * 4)
        scores += B * bq * (T * 4 * (2 + 2 * m.index_n_heads) + k * C * cb + H * k * 4 * 3)
    elif m.index_topk:  # its reference form and the dense warm-up (model/dsa.py): the float32
        # probabilities [B, H, T, T], the indexer's ReLU inputs [B, T, Hi, T], its scores and the
        # attention target [B, T, T] (float32) and the key mask (bool)
        scores = B * T * T * (4 * H + 4 * m.index_n_heads + 4 * 2 + 1)
    # context parallelism: every layer keeps the all-gathered keys and values of the whole
    # sequence for its backward pass (in natural order); one layer at a time also holds the
    # gathered copy, the float32 gradients of all of them, and those cast and put back in the
    # balanced order before the reduce-scatter (kernels/attention/context.py)
    kv_elems = B * T * kv_heads * (qk + v) if n_seq > 1 else 0
    gathered = kv_elems * cb
    attn = tokens * H * (2 * qk + 2 * v) * cb + proj + scores + gathered + 2 * tokens * D * cb
    kinds = m.layer_kinds()
    A = tokens * m.num_experts_per_tok
    if m.n_routed_experts:
        Fl = m.moe_intermediate_size / tp
        if (
            ex.moe_impl == "dropless" and math.prod(mesh_shape.values()) > 1
        ):  # expert-parallel (moe_ep.py)
            n_scope = n_batch if ex.capacity_scope == "global" else n_ep
            kept = (
                ex.capacity_factor * A * n_scope / n_ep
            )  # rows one device's experts may keep (E_local x C)
            if ex.ep_exchange == "ragged":
                # send A rows, receive at most `kept`, and the results back
                rows = min(n_ep * A, kept)
                exchange = 2 * (A + rows) * D * cb
            else:
                # fixed [n_ep, per_pair] buffers (moe_ep._exchange_rounds): a round keeps six
                # [rows, D] arrays (sent, received, sorted by expert, expert outputs, back in
                # arrival order, returned; their gradients are the doubled body below)
                if ex.ep_exchange == "dropless":
                    per_pair = moe_ep.dropless_rows(math.ceil(A), n_ep, ex.dropless_buffer)
                    # in rounds, the loop carries: the float32 sum of their results, and in the
                    # backward pass the sum of the rows' gradient over the rounds (fitted, like
                    # every term here, under the body's doubling below: the V3 compiles' rounds
                    # cost ~31 bytes per row and D, of which this and the six arrays make 24)
                    exchange = A * D * (4 + cb) if per_pair < math.ceil(A) else 0
                else:
                    per_pair, exchange = min(A, kept), 0
                rows = n_ep * per_pair
                exchange += 6 * rows * D * cb
            expert_rows = rows  # the grouped matmuls run on the whole receive buffer
        elif ex.moe_impl == "capacity":
            exchange = 2 * A * ex.capacity_factor * D * cb
            expert_rows = A
        else:
            exchange = 2 * A * D * cb
            expert_rows = A
        moe = exchange + expert_rows * Fl * (2 * 4 + cb) + tokens * m.n_routed_experts * 4 * 3
        moe += tokens * m.n_shared_experts * m.moe_intermediate_size / tp * (2 * 4 + cb)
    else:
        moe = 0
    dense = tokens * m.intermediate_size / tp * (2 * 4 + cb)
    per_layer = {"moe": attn + moe + tokens * D * 4 * 2, "dense": attn + dense + tokens * D * 4 * 2}
    layers = [per_layer[k] for k in kinds] + [
        per_layer["moe" if m.n_routed_experts else "dense"]
    ] * m.mtp_depth
    # remat 'full' keeps each scanned body's input and rebuilds one body (with its gradients)
    carry, bodies = tokens * D * cb, [[x] for x in layers]
    layer_scores = [scores] * len(layers)
    if m.attention_type == "v4":  # a body is one group of layers (v4.groups), streams its input
        from moejax.model import v4 as v4_lib

        types = m.v4_layer_types
        layers = [_v4_layer_bytes(m, ex, t, B, T, H, tp, cb) + moe for t in types]
        layer_scores = [_v4_layer_bytes(m, ex, t, B, T, H, tp, cb, scores_only=True) for t in types]
        carry, bodies, i = tokens * m.hc_mult * D * 4, [], 0
        for kinds, repeats in v4_lib.groups(m):
            for _ in range(repeats):
                bodies.append(layers[i : i + len(kinds)])
                i += len(kinds)
    if ex.remat_policy == "full":
        kept = carry * len(bodies) + 2 * max(sum(b) for b in bodies)
    elif ex.remat_policy == "none":
        kept = sum(layers)
    else:  # dots policies keep the matmul outputs but recompute the elementwise work and softmax
        kept = sum(layers) - sum(layer_scores) + 2 * max(layers)
    kept += kv_elems * (3 * cb + 4)  # the one layer's gather transients (above)
    # the float32 logits of each head (main + MTP); their gradient takes the same buffer (one
    # [tokens, V] buffer per head in the compiled V2-Lite and V3 steps)
    logits = tokens * m.vocab_size / tp * 4 * (1 + m.mtp_depth)
    return {"activations": int(kept), "logits": int(logits)}


def plan(
    cfg: Config,
    topology: str | None = None,
    chips: int | None = None,
    gen: str = "v5p",
    tokens: float = 0.0,
    mfu: float = 0.4,
    price: float | None = None,
) -> dict:
    from moejax import pod, sharding
    from moejax.model.stats import param_counts, train_flops_per_token
    from moejax.trainer import setup

    if topology:
        gen, chips, _ = pod.parse_topology(topology)
    chip = pod.CHIPS[gen]
    chips = chips or 1
    mesh = sharding.abstract_mesh(cfg.mesh, chips)
    mesh_shape = dict(mesh.shape)
    state = setup.build(cfg, mesh).abstract  # the same abstract state `moejax.train` creates
    comp = {
        "params": _shard_bytes(state["params"]),
        "optimizer": _shard_bytes(state["opt_state"]),
        "router": _shard_bytes(state["router"]),
    }
    if "frozen" in state:  # LoRA: the frozen base weights (no gradients, no moments)
        comp["frozen"] = _shard_bytes(state["frozen"])
    comp["grads"] = comp["params"]
    comp.update(activation_bytes(cfg, mesh_shape))
    if chips > 1:
        comp["gathered weights"] = gathered_weight_bytes(state["params"], mesh_shape, cfg)
        if "frozen" in state:  # LoRA: the base weights are gathered too, with no gradient
            comp["gathered weights"] += gathered_weight_bytes(
                state["frozen"], mesh_shape, cfg, grads=False
            )
    total = sum(comp.values())
    counts = param_counts(cfg.model)
    fpt = train_flops_per_token(cfg.model, cfg.data.seq_len)
    if "frozen" in state:
        # frozen weights get no weight gradient: forward (2N) + input gradient (2N) of the 6N per
        # token
        fpt = fpt * 4 / 6
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    # FP8 (execution.fp8) is emulated: operands are quantized per tile on the fly and kept in the
    # compute dtype (no bytes saved), matmuls run at the compute dtype's peak, whatever FP8 peak
    # the chip has (kernels/fp8.py)
    step_s = fpt * tokens_per_step / (chips * chip.bf16_flops * mfu)
    price = chip.price_per_hour if price is None else price
    out = {
        "chip": chip.name,
        "chips": chips,
        "mesh": mesh_shape,
        "components": comp,
        "total": total,
        "hbm": chip.hbm_bytes,
        "fits": total <= chip.hbm_bytes,
        "params_total": counts.total + counts.mtp,
        "params_activated": counts.activated,
        "flops_per_token": fpt,
        "tokens_per_step": tokens_per_step,
        "step_s": step_s,
        "tokens_per_s": tokens_per_step / step_s,
    }
    if cfg.execution.fp8:
        cd = cfg.model.compute_dtype
        out["fp8"] = (
            f"execution.fp8: emulated (E4M3 per-tile quantize/dequantize, {cd} matmuls): memory "
            f"as {cd}, time at the "
            f"{chip.bf16_flops / 1e12:.0f} TFLOP/s bf16 peak; "
            + (
                f"this chip's FP8 peak ({chip.fp8_flops / 1e12:.0f} TFLOP/s) needs a fused FP8 "
                "kernel moejax does not have"
                if chip.fp8_flops
                else f"the {chip.name} has no FP8 matmul units"
            )
        )
    if tokens:
        hours = tokens / out["tokens_per_s"] / 3600
        out.update(
            train_tokens=tokens,
            hours=hours,
            chip_hours=hours * chips,
            cost=hours * chips * price,
            price=price,
            mfu=mfu,
        )
    return out


def report(p: dict, cfg: Config) -> str:
    mesh = " ".join(f"{a}={n}" for a, n in p["mesh"].items() if n > 1) or "single device"
    lines = [
        f"[plan] {p['chips']} x {p['chip']}; mesh {mesh}; remat {cfg.execution.remat_policy}; "
        f"batch {cfg.train.batch_size} x {cfg.data.seq_len} tokens",
        f"[plan] parameters {p['params_total'] / 1e9:.2f}B total, "
        f"{p['params_activated'] / 1e9:.2f}B activated; {p['flops_per_token'] / 1e9:.1f} GFLOPs "
        "per trained token",
        "[plan] memory per device:",
    ]
    for k, v in p["components"].items():
        lines.append(f"  {k:<12} {v / GiB:9.2f} GiB")
    lines.append(
        f"  {'total':<12} {p['total'] / GiB:9.2f} GiB = {100 * p['total'] / p['hbm']:.0f}% of "
        f"{p['hbm'] / GiB:.0f} GiB HBM: {'fits' if p['fits'] else 'DOES NOT FIT'}"
    )
    lines.append(
        f"[plan] at {100 * p.get('mfu', 0.4):.0f}% MFU: {p['step_s']:.2f} s per step, "
        f"{p['tokens_per_s'] / 1e6:.2f}M tokens/s"
    )
    if "fp8" in p:
        lines.append(f"[plan] {p['fp8']}")
    if "train_tokens" in p:
        lines.append(
            f"[plan] {p['train_tokens'] / 1e12:.2f}T tokens: {p['hours'] / 24:.1f} days, "
            f"{p['chip_hours'] / 1e6:.3f}M chip-hours, ${p['cost'] / 1e6:.2f}M at "
            f"${p['price']:.2f}/chip-hour"
        )
    return "\n".join(lines)


def main(argv):
    from absl import flags

    from moejax import pod, sharding
    from moejax.config import ConfigError

    F = flags.FLAGS
    try:
        cfg = Config.from_dict(F.config)
        p = plan(cfg, F.topology, tokens=F.tokens, mfu=F.mfu, price=F.price)
    except (ConfigError, pod.TopologyError, sharding.ShardingError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(report(p, cfg))


def _entry():
    os.environ.setdefault(
        "JAX_PLATFORMS", "cpu"
    )  # the host plans/compiles; TPU devices come from the topology
    from moejax.experiment import config_cli

    def define(flags):
        flags.DEFINE_string(
            "topology", "v5p-8", "v5p-512 (Cloud naming) or v5p:8x8x4 (chips per dimension)"
        )
        flags.DEFINE_float(
            "tokens", 0.0, "training tokens for the time and cost estimate (e.g. 14.8e12)"
        )
        flags.DEFINE_float("mfu", 0.4, "assumed model FLOPs utilization")
        flags.DEFINE_float(
            "price", None, "USD per chip-hour (default: the chip table's list price)"
        )

    config_cli(main, define)


if __name__ == "__main__":
    _entry()
