"""The built-in instruction set: chat and prompt/completion examples made from the Python standard
library.

Every recipe runs offline on it. Three kinds of example, all with answers a person wrote (the
docstrings):

  chat     "Explain what this Python function does" + the function without its docstring -> its
           docstring
  chat     a system turn, then "What is the `pkg.module` module for?" -> the module docstring's
           first paragraph
  prompt   "Summarize `module.function` in one line:" -> the docstring's first line
           (prompt/completion format)

The files are read with `ast` (nothing is imported), in sorted order, so the set is the same on
every machine with the same Python; it is written once to
`cache_dir/instructions-v<N>-py<X.Y>.jsonl`.

`build_preferences` makes preference pairs (DPO) from the same answers: chosen is the docstring,
rejected the same words in a shuffled order (a fixed seed per example): a preference for well-formed
text that a small model can learn, measured on held-out pairs.
"""

from __future__ import annotations

import ast
import json
import os
import sys
import sysconfig
import textwrap

VERSION = 1
SKIP_DIRS = (
    "site-packages",
    "dist-packages",
    "__pycache__",
    "test",
    "tests",
    "idle_test",
    "lib2to3",
    "turtledemo",
)
SYSTEM = "You are a concise assistant for Python programmers."


def _without_docstring(src_lines: list[str], fn: ast.FunctionDef) -> str | None:
    doc = fn.body[0]
    lines = src_lines[fn.lineno - 1 : fn.end_lineno]
    start, end = doc.lineno - fn.lineno, doc.end_lineno - fn.lineno + 1
    code = textwrap.dedent("\n".join(lines[:start] + lines[end:]))
    return code if code.strip() and len(fn.body) > 1 else None


def examples_of(path: str, module: str, max_code_chars: int = 700) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            src = f.read()
        tree = ast.parse(src)
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []
    lines = src.splitlines()
    out = []
    mdoc = ast.get_docstring(tree)
    if mdoc and 40 <= len(mdoc.split("\n\n")[0]) <= 600:
        out.append(
            {
                "messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"What is the `{module}` module for?"},
                    {"role": "assistant", "content": mdoc.split("\n\n")[0].strip()},
                ]
            }
        )
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if not doc or not 20 <= len(doc) <= 600:
            continue
        code = _without_docstring(lines, node)
        if code is None or len(code) > max_code_chars:
            continue
        out.append(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": f"Explain what this Python function does:\n\n{code}",
                    },
                    {"role": "assistant", "content": doc},
                ]
            }
        )
        first = doc.strip().splitlines()[0].strip()
        if len(first) >= 15:
            out.append(
                {"prompt": f"Summarize `{module}.{node.name}` in one line:\n", "completion": first}
            )
    return out


def build(cache_dir: str, max_examples: int = 4000) -> str:
    """The instruction set's JSONL file (written on first use)."""
    path = os.path.join(
        cache_dir, f"instructions-v{VERSION}-py{sys.version_info[0]}.{sys.version_info[1]}.jsonl"
    )
    if os.path.exists(path):
        return path
    root = sysconfig.get_paths()["stdlib"]
    rows = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in SKIP_DIRS)
        for name in sorted(files):
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, name), root)[:-3].replace(os.sep, ".")
                rows += examples_of(os.path.join(d, name), rel.removesuffix(".__init__"))
    os.makedirs(cache_dir, exist_ok=True)
    _write_jsonl(path, rows[:max_examples])
    return path


def _write_jsonl(path: str, rows: list[dict]) -> None:
    """Writes rows to a temporary file renamed into place: a reader never sees a partial file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def build_preferences(cache_dir: str, max_examples: int = 4000) -> str:
    """The built-in preference pairs' JSONL file (written on first use)."""
    import random

    path = os.path.join(
        cache_dir, f"preferences-v{VERSION}-py{sys.version_info[0]}.{sys.version_info[1]}.jsonl"
    )
    if os.path.exists(path):
        return path
    out = []
    with open(build(cache_dir, max_examples)) as f:
        for i, line in enumerate(f):
            row = json.loads(line)
            if "messages" in row:
                prompt, answer = row["messages"][:-1], row["messages"][-1]["content"]
            else:
                prompt, answer = [{"role": "user", "content": row["prompt"]}], row["completion"]
            words = answer.split()
            if len(words) < 4:
                continue
            shuffled = words[:]
            random.Random(i).shuffle(shuffled)
            if shuffled == words:
                continue
            out.append({"prompt": prompt, "chosen": answer, "rejected": " ".join(shuffled)})
    _write_jsonl(path, out)
    return path


def build_arithmetic(
    cache_dir: str, max_value: int = 20, ops: str = "+-", held_out: int = 64, copy: float = 0.0
) -> str:
    """SFT examples of the built-in arithmetic task (GRPO's starting point): every training problem
    of `rewards.arithmetic_split` as a user turn answered by its '#### <answer>' line. The held-out
    problems, which GRPO's evaluation scores, are left out. copy: the share of demonstrations
    answered with the first operand (`rewards.copy_demonstrations`)."""
    from moejax.finetune import rewards

    tag = f"-copy{copy!r}" if copy > 0 else ""
    path = os.path.join(
        cache_dir,
        f"arithmetic-v{VERSION}-{max_value}-{ops.encode().hex()}-{held_out}{tag}.jsonl",
    )
    if not os.path.exists(path):
        train, _ = rewards.arithmetic_split(max_value, ops, held_out)
        train = rewards.copy_demonstrations(train, copy)
        _write_jsonl(
            path,
            [
                {
                    "messages": [
                        {"role": "user", "content": p["prompt"]},
                        {"role": "assistant", "content": rewards.solution(p)},
                    ]
                }
                for p in train
            ],
        )
    return path
