"""Command line: python -m moejax.convert {hf-to-moejax,moejax-to-hf} --src DIR --dst DIR."""

from __future__ import annotations

import argparse
import sys


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m moejax.convert", description=__doc__)
    p.add_argument("direction", choices=["hf-to-moejax", "moejax-to-hf"])
    p.add_argument("--src", required=True, help="source directory")
    p.add_argument("--dst", required=True, help="destination directory (written atomically)")
    p.add_argument("--model-type", default=None, help="moejax-to-hf: deepseek_v3|deepseek_v2|mixtral|qwen3_moe")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="moejax-to-hf: dtype of the written tensors")
    args = p.parse_args(argv)

    from moejax.convert import checkpoint

    if args.direction == "hf-to-moejax":
        checkpoint.hf_to_moejax(args.src, args.dst)
    else:
        checkpoint.moejax_to_hf(args.src, args.dst, model_type=args.model_type, dtype=args.dtype)
    print(f"wrote {args.dst}")


if __name__ == "__main__":
    sys.exit(main())
