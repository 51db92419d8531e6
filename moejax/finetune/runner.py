"""Fine-tuning runs: a base model, instruction or new-domain data, the pretraining trainer.

`run(cfg, workdir)` resolves the base (`cfg.base`: a training workdir, a moejax checkpoint or a
Hugging Face folder), takes its architecture and tokenizer, prepares the SFT data with that
tokenizer (or checks that the continual-pretraining data was tokenized by it), and hands everything
to `moejax.train.run`: the same trainer, checkpoints, metrics, resume and preemption as pretraining.
The base weights are read straight into the run's shardings (`moejax.infer.load`); with LoRA they
stay frozen in the state and the checkpoints hold only the adapters and their optimizer state (a
resumed run reads the base again).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax

from moejax.config import Config, ConfigError, ModelConfig, upgrade_saved
from moejax.data import chat, dataset, layout, mixture
from moejax.finetune.data import file_digest

# How a run trains, not what the base is: these model and router fields come from the recipe,
# every other from the base (the execution section is the recipe's whole).
RUN_FIELDS = ("param_dtype", "compute_dtype", "mtp_loss_weight", "dsa_stage")
RUN_ROUTER_FIELDS = (
    "jitter",
    "aux_loss_coef",
    "seq_aux_loss_coef",
    "z_loss_coef",
    "bias_update_rate",
)


# a recipe's model.index_topk > 0 on a base without indexers adds them (with these shapes)
INDEXER_FIELDS = ("index_topk", "index_n_heads", "index_head_dim")


class BaseError(ValueError):
    pass


def base_kind(path: str) -> str:
    from moejax.infer.load import split_step

    path = split_step(path)[0]
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return "workdir"
    if os.path.isdir(os.path.join(path, "state")) and os.path.exists(
        os.path.join(path, "config.json")
    ):
        return "moejax"
    if os.path.exists(os.path.join(path, "config.json")):
        return "hf"
    raise BaseError(
        f"base={path!r}: not a training workdir (checkpoints/), a moejax checkpoint (config.json + "
        "state/) or a Hugging Face folder (config.json + *.safetensors)"
    )


def base_model_config(path: str) -> ModelConfig:
    kind = base_kind(path)
    if kind == "workdir":
        from moejax.infer.load import workdir_config

        return workdir_config(path).model
    with open(os.path.join(base_dir(path), "config.json")) as f:
        d = json.load(f)
    if kind == "moejax":
        return ModelConfig.from_dict(upgrade_saved(d))
    from moejax.convert.hf_config import from_hf_config

    return from_hf_config(d)


def base_tokenizer(path: str) -> tuple[str, dict]:
    """(tokenizer file, special tokens) of a base: a workdir's data tokenizer, a folder's
    tokenizer.json or tokenizer.model."""
    if base_kind(path) == "workdir":
        from moejax.infer.load import workdir_config

        cfg = workdir_config(path)
        if (
            cfg.align.method == "grpo" and base_kind(cfg.base) != "workdir"
        ):  # RL on a folder: the folder's
            return base_tokenizer(cfg.base)
        d = mixture.resolve(cfg.data, cfg.model.vocab_size)[0][0]
        hf = os.path.join(d, layout.HF_TOKENIZER)
        if os.path.exists(hf):
            return hf, layout.read_manifest(d).get("special_tokens", {})
        return os.path.join(d, layout.TOKENIZER), {}
    path = base_dir(path)
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        from moejax.infer.load import hf_tokenizer

        return os.path.join(path, "tokenizer.json"), hf_tokenizer(path).special
    if os.path.exists(os.path.join(path, layout.TOKENIZER)):
        return os.path.join(path, layout.TOKENIZER), {}
    raise BaseError(f"base={path!r} has no tokenizer (tokenizer.json or tokenizer.model)")


def chat_template(cfg: Config) -> str | None:
    """sft.template (a jinja2 file, or a tokenizer_config.json), else the base's, else None (built
    in)."""
    t = cfg.sft.template
    if t:
        if not os.path.exists(t):
            raise ConfigError(f"sft.template: no such file {t!r}")
        if t.endswith(".json"):
            tpl = chat.chat_template_of(t)
            if not tpl:
                raise ConfigError(f"sft.template: {t} has no chat_template")
            return tpl
        with open(t) as f:
            return f.read()
    return (
        chat.chat_template_of(base_dir(cfg.base))
        if cfg.base and base_kind(cfg.base) != "workdir"
        else None
    )


def base_dir(base: str) -> str:
    """The base's directory (without a workdir's '@step')."""
    from moejax.infer.load import split_step

    return split_step(base)[0]


def _check_held_out(cfg: Config, base_run: Config) -> None:
    """GRPO on the built-in task from a base that trained on it (arithmetic SFT, or GRPO): the same
    problems (grpo.max_value, grpo.ops) and held-out problems among the base's (held_out no
    larger), or the held-out score would count problems the base was trained on."""
    g, b = cfg.grpo, base_run.grpo
    trained_on_task = base_run.sft.data == "arithmetic" or (
        base_run.align.method == "grpo" and b.task == "arithmetic"
    )
    if cfg.align.method != "grpo" or g.task != "arithmetic" or not trained_on_task:
        return
    for name in ("max_value", "ops"):
        if getattr(g, name) != getattr(b, name):
            raise ConfigError(
                f"grpo.{name}: got {getattr(g, name)!r}, but the base trained on the task with "
                f"{getattr(b, name)!r}: its held-out split would hold problems the base trained on"
            )
    if g.held_out > b.held_out:
        raise ConfigError(
            f"grpo.held_out: got {g.held_out}, more than the base's {b.held_out}: the extra "
            "held-out problems were trained on"
        )


def resolve(cfg: Config) -> Config:
    """The run's config: the base's architecture (RUN_FIELDS, RUN_ROUTER_FIELDS and the whole
    execution section from the recipe) and the data source the run reads (SFT data prepared, with
    the base's tokenizer, into the data cache). Raises BaseError/ConfigError."""
    from moejax.data.builtin import default_cache_dir

    cache = cfg.data.cache_dir or default_cache_dir()
    if cfg.lora.rank and not cfg.base:
        raise ConfigError(
            "base: LoRA (lora.rank > 0) trains adapters on a base model; name it "
            "with --config.base="
        )
    if cfg.extend.rope_factor and not cfg.base:
        raise ConfigError(
            "base: a long-context extension (extend.rope_factor > 0) continues a pretrained model; "
            "name it with --config.base="
        )
    if cfg.align.method and not cfg.base:
        raise ConfigError(
            f"base: align.method={cfg.align.method!r} needs the model to align (--config.base=)"
        )
    if cfg.align.method in ("dpo", "reward") and not cfg.sft.data:
        raise ConfigError(
            f"sft.data: {cfg.align.method} needs preference pairs (JSONL rows with prompt, chosen "
            "and rejected, or 'builtin')"
        )
    if cfg.base:
        from moejax.infer.load import latest_step, split_step

        path, step = split_step(
            os.path.abspath(os.path.expanduser(cfg.base))
        )  # absolute: resumable from anywhere
        if base_kind(path) == "workdir" and step is None:
            step = latest_step(
                path
            )  # pinned: a base run that goes on training does not move under the adapters
        cfg = dataclasses.replace(cfg, base=path if step is None else f"{path}@{step}")
        base = base_model_config(cfg.base)
        router = base.router.replace(**{f: getattr(cfg.model.router, f) for f in RUN_ROUTER_FIELDS})
        run = {f: getattr(cfg.model, f) for f in RUN_FIELDS}
        if cfg.model.index_topk and not base.index_topk:
            # DeepSeek-V3.2's recipe: a dense MLA base gets new lightning indexers (BaseStart
            # draws them), trained alone in the dense warm-up, then with everything (sparse)
            if cfg.lora.rank or cfg.align.method:
                raise ConfigError(
                    "model.index_topk: new sparse-attention indexers are added to a dense base by "
                    "full continual pretraining (experiments/continual.py), not under LoRA or "
                    f"align.method={cfg.align.method!r}; add them first, then fine-tune that run"
                )
            run.update({f: getattr(cfg.model, f) for f in INDEXER_FIELDS})
        elif cfg.model.index_topk and base.index_topk:  # the keys kept: no parameter changes
            run["index_topk"] = cfg.model.index_topk
        if run["dsa_stage"] == "warmup" and cfg.lora.rank:
            raise ConfigError(
                "model.dsa_stage='warmup' trains the indexers alone, which LoRA freezes with the "
                "base; run the warm-up with full weights (lora.rank=0)"
            )
        model = base.replace(router=router, **run)
        from moejax.trainer.setup import uses_reference

        if uses_reference(cfg) and router.jitter > 0:
            raise ConfigError(
                f"model.router.jitter: must be 0 with align.method={cfg.align.method!r} (the "
                f"policy and its reference must route alike), got {router.jitter}"
            )
        if uses_reference(cfg) and router.use_score_correction_bias and router.bias_update_rate:
            # the reference pass runs the state's router biases (with LoRA it is the same model,
            # adapters off): they must stay the base's for the reference to be the frozen base
            raise ConfigError(
                f"model.router.bias_update_rate: must be 0 with align.method="
                f"{cfg.align.method!r} (the reference model is the frozen base, its routing biases "
                f"included), got {router.bias_update_rate}"
            )
        trained = 0  # the base run's sequence length: YaRN's original length by default
        if base_kind(cfg.base) == "workdir":
            from moejax.infer.load import workdir_config

            base_run = workdir_config(cfg.base)
            trained = base_run.data.seq_len
            _check_held_out(cfg, base_run)
        cfg = dataclasses.replace(cfg, model=cfg.extend.apply(model, trained))
        tok_file, special = base_tokenizer(cfg.base)
    elif cfg.sft.data:
        # no base (a from-scratch run, e.g. a test): the tokenizer of the configured pretraining
        # data
        d = mixture.resolve(cfg.data, cfg.model.vocab_size)[0][0]
        tok_file = os.path.join(
            d,
            layout.HF_TOKENIZER
            if os.path.exists(os.path.join(d, layout.HF_TOKENIZER))
            else layout.TOKENIZER,
        )
        special = layout.read_manifest(d).get("special_tokens", {})
    if (
        cfg.align.method == "grpo"
    ):  # rollouts, not a dataset: the tokenizer is the base's (GRPOStart)
        if (
            base_kind(cfg.base) == "workdir"
        ):  # the run's data names the base's tokenizer (loading the run finds it)
            from moejax.infer.load import workdir_config

            bdata = workdir_config(cfg.base).data
            cfg = dataclasses.replace(
                cfg, data=dataclasses.replace(bdata, seq_len=cfg.data.seq_len)
            )
        return cfg
    if cfg.sft.data:
        from moejax.finetune import data as sft_data
        from moejax.finetune import instructions

        kind = "preference" if cfg.align.method in ("dpo", "reward") else "sft"
        if cfg.sft.data == "builtin":
            files = [
                instructions.build_preferences(cache)
                if kind == "preference"
                else instructions.build(cache)
            ]
        elif (
            cfg.sft.data == "arithmetic"
        ):  # GRPO's task as SFT examples (its held-out problems left out)
            if kind == "preference":
                raise ConfigError("sft.data='arithmetic' is an SFT set, not preference pairs")
            files = [
                instructions.build_arithmetic(
                    cache, cfg.grpo.max_value, cfg.grpo.ops, cfg.grpo.held_out, cfg.grpo.demo_copy
                )
            ]
        else:
            files = [os.path.expanduser(f.strip()) for f in cfg.sft.data.split(",") if f.strip()]
            missing = [f for f in files if not os.path.exists(f)]
            if missing:
                raise ConfigError(f"sft.data: no such file {missing[0]!r}")
        out = sft_data.cached(
            files,
            tok_file,
            cache,
            seq_len=cfg.data.seq_len,
            template=chat_template(cfg),
            loss_on=cfg.sft.loss_on,
            val_fraction=cfg.data.val_fraction,
            special=special,
            kind=kind,
            max_pairs=cfg.align.max_pairs_per_row,
        )
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=out))
    if cfg.base:  # continual pretraining: the data must be the base's tokens
        for path, _ in mixture.resolve(cfg.data, cfg.model.vocab_size):
            if layout.tokenizer_digest(path) != file_digest(tok_file):
                raise BaseError(
                    f"data.source {path} was tokenized with a different tokenizer than "
                    f"base={cfg.base} ({tok_file}); prepare it with that tokenizer "
                    "(moejax.data.prepare tokenizer.model/tokenizer.hf)"
                )
    return cfg


def load_base(cfg: Config, mesh=None, rules=None):
    """The base model in the run's parameter dtype, on `mesh` (default: one device)."""
    from moejax.infer.load import load

    kind = base_kind(cfg.base)
    dtype = None if kind == "workdir" else cfg.model.param_dtype
    model, _ = load(cfg.base, mesh=mesh, rules=rules, dtype=dtype, execution=cfg.execution)
    if kind == "workdir" and cfg.model.param_dtype != model.cfg.param_dtype:
        raise BaseError(
            f"model.param_dtype={cfg.model.param_dtype!r} but the base workdir keeps "
            f"{model.cfg.param_dtype!r}"
        )
    return model


def with_new_indexers(params, ts):
    """A dense base's parameters with freshly drawn lightning indexers (DeepSeek Sparse Attention)
    added: drawn by one jitted program straight into their shardings (the rest of the model it
    builds is dead code, never materialized)."""
    from flax import nnx

    from moejax.trainer.setup import build_model

    cfg = ts.cfg

    def indexers():
        model = build_model(cfg, ts.mesh, ts.rules, cfg.train.seed + 29)
        flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
        return nnx.from_flat_state([(p, v) for p, v in flat if "indexer" in p])

    shardings = dict(nnx.to_flat_state(ts.shardings["params"]))
    abstract = nnx.to_flat_state(jax.eval_shape(indexers))
    out = nnx.from_flat_state([(p, shardings[p]) for p, _ in abstract])
    fresh = jax.jit(indexers, out_shardings=out)()
    merged = nnx.from_flat_state(list(nnx.to_flat_state(params)) + list(nnx.to_flat_state(fresh)))
    want = {p for p, _ in nnx.to_flat_state(ts.abstract["params"])}
    got = {p for p, _ in nnx.to_flat_state(merged)}
    if got != want:
        raise BaseError(
            f"adding indexers to base={cfg.base}: parameters differ from the run's "
            f"({sorted(map(str, got ^ want))[:4]})"
        )
    return merged


class BaseStart:
    """The starting weights of a fine-tuning run (moejax.train.run's `start_from`)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def _model(self, ts):
        return load_base(self.cfg, ts.mesh, ts.rules)

    def init(self, ts):
        from moejax.trainer.step import split_model

        model = self._model(ts)
        if ts.has_frozen:
            return ts.init_state(frozen=ts.frozen_of(model))
        if self.cfg.align.method == "reward":
            from moejax.finetune import reward

            reward.add_head(model, self.cfg.train.seed)  # the head is new; the trunk is the base's
        _, params, router, _ = split_model(model)
        if self.cfg.model.index_topk and not model.cfg.index_topk:
            params = with_new_indexers(params, ts)
        params = jax.device_put(params, ts.shardings["params"])
        router = jax.device_put(router, ts.shardings["router"])
        return ts.init_state(params, router if jax.tree.leaves(router) else None)

    def resume(self, ts, state):
        if ts.has_frozen:
            state = dict(state, frozen=ts.frozen_of(self._model(ts)))
        if "reference" in ts.abstract:
            from moejax.trainer.step import split_model

            state = dict(
                state,
                reference=jax.device_put(
                    split_model(self._model(ts))[1], ts.shardings["reference"]
                ),
            )
        return state


class GRPOStart(BaseStart):
    """BaseStart for align.method='grpo', with the rollouts that stand in for the data iterator."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        from moejax.data import tokenizer as tokenizer_lib
        from moejax.finetune.grpo import Rollouts

        tok_file, special = base_tokenizer(cfg.base)
        if cfg.grpo.reward_model:
            _check_reward_model(cfg, tok_file)
        self.rollouts = Rollouts(cfg, tokenizer_lib.load(tok_file, special), chat_template(cfg))


def _check_reward_model(cfg: Config, tok_file: str) -> None:
    """grpo.reward_model must be a reward-model run that reads the policy's tokens: the same
    tokenizer file and vocabulary (else its scores would be of other tokens, silently)."""
    from moejax.infer.load import split_step, workdir_config

    rm = cfg.grpo.reward_model
    if not os.path.isdir(os.path.join(split_step(os.path.abspath(rm))[0], "checkpoints")):
        raise ConfigError(f"grpo.reward_model: {rm!r} is not a training workdir")
    rm_cfg = workdir_config(rm)
    if rm_cfg.align.method != "reward":
        raise ConfigError(
            f"grpo.reward_model: {rm} is not a reward-model run (align.method='reward', got "
            f"{rm_cfg.align.method!r})"
        )
    rm_tok = base_tokenizer(rm)[0]
    if rm_cfg.model.vocab_size != cfg.model.vocab_size or file_digest(rm_tok) != file_digest(
        tok_file
    ):
        raise ConfigError(
            f"grpo.reward_model: {rm} reads other tokens than the policy (its tokenizer {rm_tok}, "
            f"vocabulary {rm_cfg.model.vocab_size}; the policy's {tok_file}, "
            f"{cfg.model.vocab_size}); train the reward model from the policy's base"
        )


def validation_loss(model, path: str, seq_len: int, batch_size: int, batches: int) -> float:
    """Next-token cross-entropy per token of `model` on the first `batches` validation batches of
    one prepared dataset (the same rows every call)."""
    import jax.numpy as jnp

    from moejax.trainer.step import shifted_targets, token_loss_sum

    @jax.jit
    def f(model, b):
        logits, _ = model(b["tokens"], b["positions"], b["segment_ids"])
        labels, valid = shifted_targets(b, 1)
        return token_loss_sum(logits, labels, valid), valid.sum()

    it = dataset.Batches(path, "validation", batch_size, seed=0, shuffle=False)
    total = count = 0.0
    for _ in range(batches):
        s, n = jax.device_get(f(model, {k: jnp.asarray(v) for k, v in next(it).items()}))
        total, count = total + float(s), count + float(n)
    return total / max(count, 1.0)


def forgetting(cfg: Config, workdir: str, batches: int | None = None) -> dict:
    """Validation loss on every source of the run's data mixture, for the base and for the run's
    last checkpoint: {source: {"base": loss, "after": loss, "old": bool}}. The base's own training
    data (a workdir base) is evaluated too, replayed or not: forgetting is the rise of the old
    domain's loss, the gain the new domain's fall."""
    from moejax.infer.load import load

    sources = [p for p, _ in mixture.resolve(cfg.data, cfg.model.vocab_size)]
    old = set()
    if base_kind(cfg.base) == "workdir":  # the base's own data is the old domain, replayed or not
        from moejax.infer.load import workdir_config

        bcfg = workdir_config(cfg.base)
        if bcfg.data.seq_len == cfg.data.seq_len:
            old = {p for p, _ in mixture.resolve(bcfg.data, bcfg.model.vocab_size)}
            sources += [p for p in sorted(old) if p not in sources]
    n = batches or max(cfg.train.eval_batches, 1)
    out = {}
    for name, path in (("base", cfg.base), ("after", workdir)):
        model = load_base(cfg) if name == "base" else load(path)[0]
        for src in sources:
            loss = validation_loss(model, src, cfg.data.seq_len, cfg.train.batch_size, n)
            out.setdefault(src, {"old": src in old})[name] = loss
    return out


def run(
    cfg: Config,
    workdir: str,
    *,
    quiet: bool = False,
    max_steps_this_run: int | None = None,
    report_forgetting: bool | None = None,
) -> dict:
    """Fine-tunes (or continues pretraining) per cfg in workdir; resumes if it holds checkpoints.

    Continual pretraining (a base, no SFT data) ends with the per-domain losses (`forgetting`),
    logged as `forgetting` in the returned metrics and printed."""
    from moejax import train

    cfg = resolve(cfg)
    start = (GRPOStart if cfg.align.method == "grpo" else BaseStart)(cfg) if cfg.base else None
    out = train.run(
        cfg, workdir, quiet=quiet, max_steps_this_run=max_steps_this_run, start_from=start
    )
    if report_forgetting is None:
        report_forgetting = (
            bool(cfg.base)
            and not cfg.sft.data
            and not cfg.align.method
            and max_steps_this_run is None
        )
    if report_forgetting:
        table = forgetting(cfg, workdir)
        out["forgetting"] = table
        if not quiet:
            for src, v in table.items():
                role = "old domain" if v["old"] else "new domain"
                if cfg.extend.rope_factor:  # a long-context stage: the same data, longer rows
                    role = f"at {cfg.data.seq_len} tokens (YaRN x{cfg.extend.rope_factor:g})"
                print(
                    f"[continual] {role} {os.path.basename(src)}: validation loss {v['base']:.4f} "
                    f"(base) -> {v['after']:.4f} ({v['after'] - v['base']:+.4f})",
                    flush=True,
                )
    return out
