"""Which datasets a config's `data.source` names: a prepared directory, a built-in corpus, or a
weighted mixture of them (`dirA=0.7,builtin=0.3`), resolved to [(directory, weight)].
"""

from __future__ import annotations

import os

from moejax.data import layout


def parse_sources(source: str | list) -> list[tuple[str, float]]:
    """`dir` or a mixture `dirA=0.7,dirB=0.3` (weights are relative) as [(path, weight)]."""
    if not isinstance(source, str):
        return [(p, float(w)) for p, w in source]
    out = []
    for part in source.split(","):
        path, _, w = part.strip().rpartition("=") if "=" in part else (part.strip(), "", "1")
        try:
            weight = float(w)
        except ValueError:
            raise ValueError(
                f"data.source: mixture weight {w!r} of {path!r} is not a number"
            ) from None
        if weight <= 0:
            raise ValueError(f"data.source: mixture weight of {path!r} must be > 0, got {weight}")
        out.append((os.path.expanduser(path), weight))
    return out


def resolve(data_cfg, vocab_size: int) -> list[tuple[str, float]]:
    """The datasets a config names, as [(directory, weight)]: a prepared directory, the built-in
    corpus ('builtin') or the built-in docs domain ('builtin-docs', both prepared on first use), or
    a mixture of them `dirA=0.7,builtin=0.3`."""
    # Imported here: the reader (dataset, in every Grain worker) needs parse_sources only, not the
    # preparation pipeline behind the built-in corpora.
    from moejax.data import builtin

    named = {"builtin": builtin.build, "builtin-docs": builtin.build_docs}
    mix = [
        (named[p](data_cfg, vocab_size) if p in named else p, w)
        for p, w in parse_sources(data_cfg.source)
    ]
    for path, _ in mix:
        manifest = layout.read_manifest(path)
        if manifest["seq_len"] != data_cfg.seq_len:
            raise ValueError(
                f"data.seq_len={data_cfg.seq_len} but {path} was packed with "
                f"seq_len={manifest['seq_len']}"
            )
    return mix
