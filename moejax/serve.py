"""An OpenAI-compatible server:

  python -m moejax.serve --model runs/default [--port 8000] [--safety block|redact|refuse|off]

POST /v1/completions and /v1/chat/completions (with "stream": true as server-sent events), GET
/v1/models and /health. Concurrent requests are batched (moejax.infer.engine); the content-safety
filter is on by default. Chat prompts are rendered with the model folder's `tokenizer_config.json`
chat template (jinja2, as transformers renders it) or a built-in one. A bad request gets a 4xx with
an OpenAI-style JSON error; the server never goes down for one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import uuid

from moejax.config import ConfigError
from moejax.data import chat
from moejax.data.chat import DEFAULT_CHAT_STOP, DEFAULT_CHAT_TEMPLATE, chat_template_of
from moejax.infer.engine import Engine
from moejax.infer.quantize import FORMATS as QUANT_FORMATS
from moejax.infer.safety import ACTIONS as SAFETY_ACTIONS
from moejax.infer.sampling import SamplingParams


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


def render_chat(template: str, messages: list[dict], *, bos: str = "", eos: str = "") -> str:
    """The prompt of a chat request (moejax.data.chat.render_chat); a template failure is a 400."""
    try:
        return chat.render_chat(template, messages, bos=bos, eos=eos)
    except chat.TemplateFailure as e:
        raise BadRequest(str(e), "messages") from None


# ------------------------------------------------------------------------------------- requests


def _field(body: dict, name: str, types, default=None):
    value = body.get(name)
    if value is None:
        return default
    allowed = types if isinstance(types, tuple) else (types,)
    if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
        raise BadRequest(f"'{name}' has the wrong type ({type(value).__name__})", name)
    return value


def sampling_from(body: dict, default_stop=()) -> SamplingParams:
    """OpenAI request fields (plus vLLM's top_k, min_p, repetition_penalty) -> SamplingParams."""
    if _field(body, "n", int, 1) != 1:
        raise BadRequest("only n=1 is supported", "n")
    stop = _field(body, "stop", (str, list), None) or []
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("'stop' must be a string or a list of non-empty strings", "stop")
    max_tokens = _field(body, "max_completion_tokens", int, None) or _field(
        body, "max_tokens", int, 16
    )
    try:
        return SamplingParams(
            temperature=float(_field(body, "temperature", (int, float), 1.0)),
            top_k=_field(body, "top_k", int, 0) or 0,
            top_p=float(_field(body, "top_p", (int, float), 1.0)),
            min_p=float(_field(body, "min_p", (int, float), 0.0)),
            repetition_penalty=float(_field(body, "repetition_penalty", (int, float), 1.0)),
            max_new_tokens=max_tokens,
            stop=tuple(stop) + tuple(default_stop),
            seed=_field(body, "seed", int, None) if "seed" in body else random.getrandbits(32),
        )
    except ConfigError as e:
        field = str(e).split(":")[0].removeprefix("sampling.")
        raise BadRequest(str(e), {"max_new_tokens": "max_tokens"}.get(field, field)) from None


class Server:
    """The application state: one engine, its tokenizer, the model's name and chat template."""

    def __init__(
        self,
        generator,
        *,
        model_name: str = "moejax",
        chat_template: str | None = None,
        max_batch: int = 16,
        wait_s: float = 0.005,
    ):
        self.generator = generator
        self.tokenizer = generator.tokenizer
        self.engine = Engine(generator, max_batch=max_batch, wait_s=wait_s)
        self.model_name = model_name
        self.chat_template = chat_template or DEFAULT_CHAT_TEMPLATE
        self.default_stop = () if chat_template else DEFAULT_CHAT_STOP
        self.max_len = generator.cfg.max_position_embeddings

    def prompt_tokens(self, prompt, max_new: int, add_bos: bool | None = None) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self.generator.encode(prompt, add_bos=add_bos)
        elif (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        ):
            ids = prompt
        else:
            raise BadRequest(
                "'prompt' must be a string or a list of token ids (one prompt per request)",
                "prompt",
            )
        vocab = self.generator.cfg.vocab_size
        if not ids or any(t < 0 or t >= vocab for t in ids):
            raise BadRequest(f"the prompt is empty or has token ids outside [0, {vocab})", "prompt")
        if len(ids) + max_new + 2 > self.max_len:
            raise BadRequest(
                f"prompt ({len(ids)} tokens) + max_tokens ({max_new}) exceeds the model's "
                f"{self.max_len} positions",
                "max_tokens",
            )
        return ids

    def chat_prompt(self, body: dict) -> str:
        messages = body.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise BadRequest(
                "'messages' must be a non-empty list of {role, content} strings", "messages"
            )
        bos = eos = ""
        tok = self.tokenizer
        if hasattr(tok, "special"):
            bos, eos = tok.special.get("bos", ""), tok.special.get("eos", "")
        return render_chat(self.chat_template, messages, bos=bos, eos=eos)


def _error(status: int, message: str, param=None):
    from starlette.responses import JSONResponse

    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": None}},
        status_code=status,
    )


def create_app(server: Server):
    """The Starlette application serving `server`."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def body_of(request: Request) -> dict:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    def usage(prompt, tokens):
        return {
            "prompt_tokens": len(prompt),
            "completion_tokens": len(tokens),
            "total_tokens": len(prompt) + len(tokens),
        }

    async def handle(request: Request, chat: bool):
        try:
            body = await body_of(request)
            params = sampling_from(body, server.default_stop if chat else ())
            if chat:
                prompt = server.prompt_tokens(
                    server.chat_prompt(body),
                    params.max_new_tokens,
                    add_bos="bos_token" not in server.chat_template,
                )
            else:
                if "prompt" not in body:
                    raise BadRequest("'prompt' is required", "prompt")
                prompt = server.prompt_tokens(body["prompt"], params.max_new_tokens)
            stream = bool(_field(body, "stream", bool, False))
        except BadRequest as e:
            return _error(e.status, str(e), e.param)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if not stream:
            try:
                out = await asyncio.wrap_future(server.engine.submit(prompt, params))
            except Exception as e:  # noqa: BLE001
                return _error(500, f"generation failed: {e}")
            choice = {"index": 0, "finish_reason": out.finish_reason, "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": out.text}
            else:
                choice["text"] = out.text
            return JSONResponse(
                {
                    "id": rid,
                    "object": "chat.completion" if chat else "text_completion",
                    "created": created,
                    "model": server.model_name,
                    "choices": [choice],
                    "usage": usage(prompt, out.tokens),
                    "safety": out.safety,
                }
            )
        return StreamingResponse(
            _stream(server, prompt, params, chat, rid, created), media_type="text/event-stream"
        )

    async def completions(request):
        return await handle(request, chat=False)

    async def chat_completions(request):
        return await handle(request, chat=True)

    async def models(request):
        return JSONResponse(
            {
                "object": "list",
                "data": [{"id": server.model_name, "object": "model", "owned_by": "moejax"}],
            }
        )

    async def health(request):
        return JSONResponse({"status": "ok", "batches": len(server.engine.batch_sizes)})

    async def http_error(request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail))

    app = Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error},
    )
    app.state.server = server
    return app


async def _stream(server: Server, prompt, params, chat: bool, rid: str, created: int):
    """Server-sent events: text deltas as decode chunks finish, held back by the longest stop string
    and the safety filter's window so that nothing sent is later cut or redacted; then the final
    remainder."""
    loop = asyncio.get_running_loop()
    updates: asyncio.Queue = asyncio.Queue()
    gen = server.generator
    hold = max([len(s) for s in params.stop] + [gen.safety.holdback if gen.safety else 0])
    if gen.safety is not None and (
        gen.safety.action == "refuse" or gen.safety.classifier is not None
    ):
        hold = (
            1 << 30
        )  # a refusal replaces everything, a classifier may flag any stretch: send at the end

    def on_tokens(tokens, done):
        loop.call_soon_threadsafe(updates.put_nowait, tokens)

    future = server.engine.submit(prompt, params, stream=on_tokens)
    obj = "chat.completion.chunk" if chat else "text_completion"

    def event(text=None, finish=None, first=False):
        if chat:
            delta = {"role": "assistant"} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return (
            "data: "
            + json.dumps(
                {
                    "id": rid,
                    "object": obj,
                    "created": created,
                    "model": server.model_name,
                    "choices": [choice],
                }
            )
            + "\n\n"
        )

    if chat:
        yield event(first=True)
    sent = ""
    wrapped = asyncio.wrap_future(future)
    while not wrapped.done():
        getter = asyncio.ensure_future(updates.get())
        await asyncio.wait([getter, wrapped], return_when=asyncio.FIRST_COMPLETED)
        if not getter.done():
            getter.cancel()
            continue
        text = gen.decode_text(getter.result()) if gen.tokenizer is not None else ""
        if any(s in text for s in params.stop) or (
            gen.safety is not None and gen.safety.pattern_matches(text)
        ):
            continue  # the row is ending here: the final text decides what is sent
        safe = text[: max(0, len(text) - hold)].rstrip("\ufffd")
        if len(safe) > len(sent) and safe.startswith(sent):
            yield event(safe[len(sent) :])
            sent = safe
    try:
        out = wrapped.result()
    except Exception as e:  # noqa: BLE001
        yield (
            "data: "
            + json.dumps({"error": {"message": f"generation failed: {e}", "type": "server_error"}})
            + "\n\n"
        )
        return
    final = out.text or ""
    if final.startswith(sent) and len(final) > len(sent):
        yield event(final[len(sent) :])
    yield event(finish=out.finish_reason)
    yield "data: [DONE]\n\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m moejax.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", required=True, help="training workdir, moejax checkpoint or Hugging Face folder"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--name", default=None, help="the model id clients see (default: the folder name)"
    )
    p.add_argument("--tokenizer", default=None)
    p.add_argument(
        "--chat_template", default=None, help="a jinja2 file (default: the model's, else built in)"
    )
    p.add_argument("--safety", default="block", choices=(*SAFETY_ACTIONS, "off"))
    p.add_argument("--safety_categories", default=None, help="JSON {category: [words or regexes]}")
    p.add_argument(
        "--safety_classifier", default=None, help="module:function(text) -> reason or None"
    )
    p.add_argument("--max_batch", type=int, default=16)
    p.add_argument("--quantize", default=None, choices=tuple(QUANT_FORMATS))
    p.add_argument("--kv_int8", action="store_true")
    args = p.parse_args(argv)

    from moejax.infer import Generator
    from moejax.infer.load import LoadError, load
    from moejax.infer.safety import SafetyFilter

    try:
        model, tok = load(args.model, tokenizer=args.tokenizer)
        if tok is None:
            raise ValueError(f"{args.model} has no tokenizer: pass --tokenizer")
        if args.quantize:
            from moejax.infer.quantize import quantize

            model = quantize(model, args.quantize)
        safety = None
        if args.safety != "off":
            kw = {"action": args.safety, "classifier": args.safety_classifier}
            safety = (
                SafetyFilter.from_file(args.safety_categories, **kw)
                if args.safety_categories
                else SafetyFilter(**kw)
            )
        template = None
        if args.chat_template:
            with open(args.chat_template) as f:
                template = f.read()
        template = template or chat_template_of(args.model)
        gen = Generator(model, tok, kv_int8=args.kv_int8, safety=safety)
        server = Server(
            gen,
            model_name=args.name or os.path.basename(os.path.abspath(args.model)),
            chat_template=template,
            max_batch=args.max_batch,
        )
    except (ValueError, ConfigError, LoadError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
