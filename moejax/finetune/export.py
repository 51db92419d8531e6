"""Exports a fine-tuning run: its adapters alone, or the merged model (Hugging Face or moejax
format).

  python -m moejax.finetune.export --workdir runs/sft_lora --out OUT [--format hf|moejax|adapters]

The merged model is the base with the adapters folded in (moejax.finetune.lora.merge), the way
inference runs it; `--format hf` writes safetensors + config.json that transformers loads
(moejax.convert.to_hf).
"""

from __future__ import annotations

import argparse
import os
import sys

from moejax.config import DTYPES

FORMATS = ("hf", "moejax", "adapters")


def export(workdir: str, out: str, fmt: str = "hf", dtype: str = "float32") -> str:
    from flax import nnx

    from moejax.convert import to_hf
    from moejax.convert.checkpoint import save_model
    from moejax.finetune import lora
    from moejax.infer.load import workdir_config
    from moejax.trainer import setup as setup_lib
    from moejax.trainer.checkpoint import Checkpointer

    if fmt not in FORMATS:
        raise ValueError(f"--format: got {fmt!r}, allowed: {', '.join(FORMATS)}")
    cfg = workdir_config(workdir)
    ts = setup_lib.build(cfg)
    ckpt = Checkpointer(workdir, cfg)
    step = ckpt.latest_step()
    if step is None:
        ckpt.close()
        raise FileNotFoundError(f"{workdir} holds no complete checkpoint")
    state, _ = ts.restore(ckpt, step)
    ckpt.close()
    if ts.has_frozen:
        from moejax.finetune.runner import BaseStart

        state = BaseStart(cfg).resume(ts, state)
    model = nnx.merge(ts.graphdef, state["params"], state["router"], state.get("frozen", ts.rest))
    if fmt == "adapters":
        if not ts.has_frozen:
            raise ValueError(
                f"{workdir} is not a LoRA run (lora.rank=0): nothing to export as adapters"
            )
        lora.save_adapters(model, out, cfg.lora)
        return out
    if ts.has_frozen:
        model = lora.merge(model)
    if fmt == "hf":
        to_hf(model, cfg.model, out, dtype=dtype)
    else:
        save_model(model, cfg.model, out)
    _copy_tokenizer(cfg, out)
    return out


def _copy_tokenizer(cfg, out: str) -> None:
    """The run's tokenizer beside the export: the base folder's tokenizer files (chat template
    included), or the training data's tokenizer."""
    import shutil

    from moejax.data import layout, mixture

    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", layout.TOKENIZER)
    from moejax.finetune.runner import base_dir

    base = base_dir(cfg.base) if cfg.base else ""
    src = (
        [os.path.join(base, n) for n in names]
        if base and not os.path.isdir(os.path.join(base, "checkpoints"))
        else []
    )
    if not any(os.path.exists(f) for f in src):
        d = mixture.resolve(cfg.data, cfg.model.vocab_size)[0][0]
        src = [os.path.join(d, n) for n in (layout.HF_TOKENIZER, layout.TOKENIZER)]
    for f in src:
        if os.path.exists(f):
            shutil.copy(f, out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--format", default="hf", choices=FORMATS)
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="hf weights")
    args = p.parse_args(argv)
    try:
        path = export(args.workdir, args.out, args.format, args.dtype)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"[export] {args.format} -> {os.path.abspath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
