"""Command line: python -m moejax.convert {hf-to-moejax,moejax-to-hf} --src DIR --dst DIR
[--mesh fsdp=-1,expert=2] [--rules embed=fsdp+expert] [--dtype bfloat16].

Both directions stream through a device mesh (default: one device). Bad input (a mesh the model
cannot be split onto, a missing tensor, a tensor of the wrong shape) prints one `error: ...` line
and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from moejax.config import DTYPES as _DTYPES
from moejax.config import MeshConfig


def parse_mesh(text: str, rules: str = "") -> MeshConfig:
    """'fsdp=-1,expert=2' -> MeshConfig(fsdp=-1, expert=2, rules=rules); unnamed axes keep their
    defaults."""
    fields = [f.name for f in dataclasses.fields(MeshConfig) if f.name != "rules"]
    kw = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = (x.strip() for x in item.partition("="))
        try:
            if not sep or name not in fields:
                raise ValueError
            kw[name] = int(value)
        except ValueError:
            raise ValueError(
                f"--mesh: {item!r} must be axis=N with axis one of {', '.join(fields)}"
            ) from None
    return MeshConfig(**kw, rules=rules)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m moejax.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("direction", choices=["hf-to-moejax", "moejax-to-hf"])
    p.add_argument("--src", required=True, help="source directory")
    p.add_argument("--dst", required=True, help="destination directory (written atomically)")
    p.add_argument(
        "--model-type",
        default=None,
        help="moejax-to-hf: deepseek_v3|deepseek_v32|deepseek_v4|deepseek_v2|deepseek|mixtral|"
        "qwen3_moe "
        "(default: from the config)",
    )
    p.add_argument(
        "--mesh",
        default=None,
        help="device mesh degrees, e.g. 'fsdp=-1,expert=2' (MeshConfig fields; default: one "
        "device)",
    )
    p.add_argument(
        "--rules",
        default="",
        help="logical-axis rule overrides, e.g. 'embed=fsdp+expert' (MeshConfig.rules)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=_DTYPES,
        help="hf-to-moejax: parameter dtype (default: the config's param_dtype); "
        "moejax-to-hf: dtype of the written tensors (default float32)",
    )
    args = p.parse_args(argv)

    from moejax import sharding
    from moejax.convert import checkpoint

    try:
        mesh = rules = None
        if args.mesh is not None or args.rules:
            shape = parse_mesh(args.mesh or "", args.rules)
            rules = sharding.rules_for(shape)
            mesh = sharding.make_mesh(shape) if args.mesh is not None else None
        if args.direction == "hf-to-moejax":
            checkpoint.hf_to_moejax(args.src, args.dst, mesh=mesh, rules=rules, dtype=args.dtype)
        else:
            checkpoint.moejax_to_hf(
                args.src,
                args.dst,
                model_type=args.model_type,
                dtype=args.dtype or "float32",
                mesh=mesh,
                rules=rules,
            )
    except (
        ValueError,
        OSError,
    ) as e:  # ShardingError, UnsupportedConfig, ConfigError are ValueErrors
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
