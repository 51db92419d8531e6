"""The OpenAI-compatible server, over real HTTP on 127.0.0.1: completions, chat, streaming, batching
of concurrent requests, the safety filter, and 4xx JSON errors for bad requests."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from flax import nnx

httpx = pytest.importorskip("httpx", reason="server tests need the test extra (httpx)")
uvicorn = pytest.importorskip("uvicorn", reason="server tests need the serve extra")

from moejax.infer import Generator, SamplingParams  # noqa: E402
from moejax.infer.safety import SafetyFilter  # noqa: E402
from moejax.model import Transformer  # noqa: E402
from moejax.serve import Server, create_app, render_chat  # noqa: E402
from tests.helpers import TINY_MLA  # noqa: E402

CFG = TINY_MLA.replace(mtp_depth=0, initializer_range=0.3, max_position_embeddings=256).with_router(
    n_group=1
)


class ModTokenizer:
    """Any text: a character's code modulo 64 (lossy, fine for tests); id i decodes to
    chr(48 + i)."""

    bos_id, eos_id = 0, -1

    def encode(self, text):
        return [ord(c) % 64 for c in text]

    def decode(self, ids):
        return "".join(chr(48 + i) for i in ids)


@pytest.fixture(scope="module")
def served():
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    free = Generator(model, ModTokenizer()).generate(["hello"], SamplingParams(max_new_tokens=24))[
        0
    ]
    planted = free.text[8:11]  # a substring the model writes: the "harmful" category of this test
    safety = SafetyFilter({"planted": [f"(?:{re.escape(planted)})"]}, action="block", holdback=4)
    gen = Generator(model, ModTokenizer(), safety=safety, chunk=4)
    server = Server(gen, model_name="tiny", max_batch=8, wait_s=0.2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(
        uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            httpx.get(url + "/health", timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.05)
    yield url, server, free, planted
    uv.should_exit = True
    thread.join(timeout=10)
    server.engine.close()


def post(url, path, body, **kw):
    return httpx.post(url + path, json=body, timeout=120, **kw)


def test_completion_and_its_stream_match_the_generator(served):
    url, server, free, planted = served
    prompt = "quiet"
    want = server.generator.generate([prompt], SamplingParams(max_new_tokens=12))[0]
    r = post(url, "/v1/completions", {"prompt": prompt, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    assert (
        body["choices"][0]["text"] == want.text
        and body["choices"][0]["finish_reason"] == want.finish_reason
    )
    n = len(want.tokens)
    assert body["usage"] == {
        "prompt_tokens": len(prompt) + 1,
        "completion_tokens": n,
        "total_tokens": len(prompt) + 1 + n,
    }

    with httpx.stream(
        "POST",
        url + "/v1/completions",
        json={"prompt": prompt, "max_tokens": 12, "temperature": 0, "stream": True},
        timeout=120,
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    texts = [c["choices"][0]["text"] for c in chunks]
    assert "".join(texts) == want.text
    assert sum(bool(t) for t in texts) >= 2  # text arrived while generating, not only at the end
    assert chunks[-1]["choices"][0]["finish_reason"] == want.finish_reason


def test_chat_with_the_default_template_and_streaming(served):
    url, server, _, _ = served
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = post(url, "/v1/chat/completions", {"messages": msgs, "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert message["role"] == "assistant"
    with httpx.stream(
        "POST",
        url + "/v1/chat/completions",
        json={"messages": msgs, "max_tokens": 5, "temperature": 0, "stream": True},
        timeout=120,
    ) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert (
        "".join(e["choices"][0]["delta"].get("content", "") for e in events) == message["content"]
    )
    # a Hugging Face-style template: bos token, raise_exception, add_generation_prompt
    tpl = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}"
        "[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    assert render_chat(tpl, msgs, bos="<s>") == "<s>[system] be brief\n[user] hi\n[assistant]"


def test_concurrent_requests_are_batched(served):
    url, server, _, _ = served
    before = len(server.engine.batch_sizes)
    with ThreadPoolExecutor(4) as ex:
        rs = list(
            ex.map(
                lambda i: post(
                    url,
                    "/v1/completions",
                    {"prompt": f"p{i}", "max_tokens": 4 + i, "temperature": 0.8, "seed": i},
                ),
                range(4),
            )
        )
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    assert [r.json()["usage"]["completion_tokens"] for r in rs] == [4, 5, 6, 7]
    assert max(server.engine.batch_sizes[before:]) > 1


def test_the_safety_filter_is_applied(served):
    url, _, free, planted = served
    r = post(url, "/v1/completions", {"prompt": "hello", "max_tokens": 24, "temperature": 0})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "content_filter" and planted not in choice["text"]
    assert (
        choice["text"] == free.text[: free.text.find(planted)]
        and r.json()["safety"]["planted"] >= 1
    )
    with httpx.stream(
        "POST",
        url + "/v1/completions",
        json={"prompt": "hello", "max_tokens": 24, "temperature": 0, "stream": True},
        timeout=120,
    ) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    streamed = "".join(c["choices"][0]["text"] for c in chunks)
    assert streamed == choice["text"] and planted not in streamed  # nothing flagged was ever sent


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/completions", {"max_tokens": 3}, "prompt"),
        ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature"),
        ("/v1/completions", {"prompt": "x", "top_p": "high"}, "top_p"),
        ("/v1/completions", {"prompt": "x", "n": 2}, "n"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 1000}, "max_tokens"),
        ("/v1/completions", {"prompt": [1, 2, 99]}, "prompt"),
        ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop"),
        ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages"),
    ],
)
def test_bad_requests_get_a_json_4xx(served, path, body, param):
    url = served[0]
    r = post(url, path, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_malformed_bodies_and_unknown_routes_then_still_serving(served):
    url = served[0]
    r = httpx.post(url + "/v1/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "not JSON" in r.json()["error"]["message"]
    assert httpx.post(url + "/v1/completions", json=[1, 2], timeout=30).status_code == 400
    r = httpx.get(url + "/v1/nothing", timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    assert httpx.get(url + "/v1/completions", timeout=30).status_code == 405
    assert httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"] == "tiny"
    assert post(url, "/v1/completions", {"prompt": "ok", "max_tokens": 2}).status_code == 200


def test_chat_template_from_a_model_folder(tmp_path):
    from moejax.serve import chat_template_of

    assert chat_template_of(str(tmp_path)) is None
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "chat_template": [
                    {"name": "tool_use", "template": "T"},
                    {"name": "default", "template": "{{ messages[0]['content'] }}!"},
                ]
            }
        )
    )
    tpl = chat_template_of(str(tmp_path))
    assert render_chat(tpl, [{"role": "user", "content": "hey"}]) == "hey!"
