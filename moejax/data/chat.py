"""Chat templates: Hugging Face `tokenizer_config.json` jinja2 templates, or a built-in one.

One renderer for the server (prompts) and fine-tuning (training examples with assistant-only loss),
so a model is trained on exactly the text it is later prompted with.
"""

from __future__ import annotations

import functools
import json
import os

DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
DEFAULT_CHAT_STOP = ("<|user|>", "<|system|>")  # the built-in template has no end-of-turn token


class TemplateFailure(ValueError):
    """The template raised, or does not render as jinja2."""


def _raise_exception(msg):
    from jinja2.exceptions import TemplateError

    raise TemplateError(msg)


@functools.lru_cache(maxsize=16)
def compiled(template: str):
    """The template compiled once (sandboxed jinja2, trim_blocks / lstrip_blocks, raise_exception,
    as transformers renders it). Raises TemplateFailure for a template that does not parse."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise TemplateFailure(f"chat template: {e}") from None


def render_chat(
    template: str,
    messages: list[dict],
    *,
    bos: str = "",
    eos: str = "",
    add_generation_prompt: bool = True,
) -> str:
    """Renders a Hugging Face chat template. Raises TemplateFailure."""
    from jinja2.exceptions import TemplateError

    try:
        return compiled(template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos,
            eos_token=eos,
        )
    except TemplateError as e:
        raise TemplateFailure(f"chat template: {e}") from None


def chat_template_of(path: str | None) -> str | None:
    """The chat template in a model folder's tokenizer_config.json (or that file itself), if any."""
    if not path:
        return None
    cfg = path if path.endswith(".json") else os.path.join(path, "tokenizer_config.json")
    if not os.path.exists(cfg):
        return None
    with open(cfg) as f:
        tpl = json.load(f).get("chat_template")
    if isinstance(tpl, list):  # [{"name": "default", "template": ...}, ...]
        tpl = next(
            (t["template"] for t in tpl if t.get("name") == "default"),
            tpl[0]["template"] if tpl else None,
        )
    return tpl
