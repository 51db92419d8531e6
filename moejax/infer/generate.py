"""Batched generation: one prefill, then jitted decode steps on a preallocated, donated cache.

    gen = Generator(model, tokenizer)
    [c] = gen.generate(
        ["def fib(n):"], SamplingParams(temperature=0.7, max_new_tokens=64, stop=("\\n\\n",))
    )
    c.text, c.tokens, c.logprobs, c.finish_reason      # 'eos' | 'stop' | 'length'

Prompts of different lengths share a batch (right-padded; each row decodes at its own position).
Decode steps run on the device in chunks (a while loop that also ends when every row is done);
between chunks the host checks stop strings. With `speculative=True` the first MTP depth drafts one
token per step and the main model verifies it in the same forward as the next one (DeepSeek-V3
§5.4.3): greedy output is the plain greedy output; sampled output keeps the model's distribution
(speculative sampling: accept the draft d with probability min(1, p(d) / q(d)), else draw from
max(p - q, 0)).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.config import ConfigError
from moejax.infer import cache as cache_lib
from moejax.infer import sampling
from moejax.infer.forward import forward, mtp_forward
from moejax.infer.sampling import SamplingParams
from moejax.model.moe import MoE


@dataclasses.dataclass
class Completion:
    prompt_tokens: list[int]
    tokens: list[int]  # generated, without the EOS token and anything from a stop string on
    logprobs: list[
        float
    ]  # the model's log-probability of each generated token (unprocessed logits)
    finish_reason: str  # 'eos' | 'stop' | 'length' | 'content_filter'
    text: str | None = None  # decoded tokens (with a tokenizer), after the safety filter's action
    safety: dict = dataclasses.field(default_factory=dict)  # safety-filter matches per category
    eos_logprob: float | None = None  # the log-probability of the EOS that ended the row ('eos')
    # record_routes: the experts each MoE layer of the main stack chose at every position of
    # prompt + tokens (+ the EOS), int [L_moe, positions, K]; -1 where no forward ran on the
    # position (a row's last token)
    routes: np.ndarray | None = None


@dataclasses.dataclass
class Stats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    steps: int = 0  # decode steps (forward passes after the prefill)
    drafted: int = 0  # speculative: drafts checked
    accepted: int = 0  # speculative: drafts accepted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _bucket(n: int) -> int:
    """Prompt lengths compile in buckets: 16, 32, 64, ... then multiples of 512."""
    return max(16, 1 << (n - 1).bit_length()) if n <= 512 else _round_up(n, 512)


def for_inference(model):
    """A view of the model that never drops tokens: capacity MoE layers dispatch dropless and the
    expert-parallel exchange is the dropless one (as DeepSeek serves); the parameters are shared,
    the caller's model is unchanged."""
    graphdef, state = nnx.split(model)
    view = nnx.merge(graphdef, state)
    for _, m in nnx.iter_modules(view):
        if isinstance(m, MoE):
            if m.dispatch == "capacity":
                m.dispatch = "dropless"
            if m.execution.ep_exchange != "dropless":
                m.execution = m.execution.replace(ep_exchange="dropless")
    return view


class Generator:
    """Generates from a Transformer with a KV cache.

    Args:
      model: a moejax Transformer (on one device or built for a mesh).
      tokenizer: anything with encode/decode (and bos_id / eos_id); optional when prompts are token
        ids.
      eos_ids: tokens that end a row (default: the tokenizer's eos_id).
      add_bos: prepend the tokenizer's BOS to text prompts.
      cache_dtype: the cache's dtype (default: the compute dtype); kv_int8 stores int8 with
        per-token scales.
      absorbed: decode MLA with the up-projections absorbed (False: rebuild K and V from the latent
        cache).
      chunk: decode steps per device call when stop strings or a safety filter are in play (the host
        checks them between chunks).
      safety: a moejax.infer.safety.SafetyFilter applied to every row's text as it is generated.
      record_routes: record every MoE layer's expert choices (Completion.routes; RL's routing
        replay).

    A model with LoRA adapters generates as its merged weights: each device call merges them
    (temporaries) and the model's own arrays are shared, never copied.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        eos_ids=None,
        add_bos: bool = True,
        cache_dtype=None,
        kv_int8: bool = False,
        absorbed: bool = True,
        chunk: int = 16,
        safety=None,
        record_routes: bool = False,
    ):
        self.cfg = model.cfg
        self.tokenizer = tokenizer
        if eos_ids is None:
            eos = getattr(tokenizer, "eos_id", None)
            eos_ids = [] if eos is None or eos < 0 else [eos]
        self.eos_ids = np.asarray(sorted(set(int(e) for e in eos_ids)) or [-1], np.int32)
        self.add_bos = add_bos
        self.cache_dtype = jnp.dtype(cache_dtype or self.cfg.compute_dtype)
        self.kv_int8 = kv_int8
        self.absorbed = absorbed
        self.chunk = chunk
        self.safety = safety
        self.record_routes = record_routes
        if safety is not None and tokenizer is None:
            raise ValueError("a safety filter reads text: give the Generator a tokenizer")
        self.graphdef, self.state = nnx.split(for_inference(model))
        self.last_stats = Stats()
        self._prefill = jax.jit(
            self._prefill_fn, static_argnames=("max_len", "max_new", "spec", "penalty", "mode")
        )
        self._decode = jax.jit(
            self._decode_fn, static_argnames=("spec", "penalty", "mode"), donate_argnums=(1,)
        )

    def set_params(self, model) -> None:
        """Generate with another model of the same structure (e.g. the policy after an RL update):
        the compiled programs are reused, nothing recompiles."""
        graphdef, state = nnx.split(for_inference(model))
        if graphdef != self.graphdef:
            raise ValueError(
                "set_params: the model's structure differs from the one this Generator compiled for"
            )
        self.state = state

    # ------------------------------------------------------------------------------ host side

    def encode(self, prompt, add_bos: bool | None = None) -> list[int]:
        """Token ids of a text prompt (BOS first when the tokenizer has one of its own) or of a
        token list."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass token ids instead")
            ids = list(self.tokenizer.encode(prompt))
            bos = getattr(self.tokenizer, "bos_id", None)
            # a Hugging Face tokenizer without a BOS token (Qwen) reports EOS as BOS: nothing is
            # prepended
            own_bos = getattr(self.tokenizer, "special", {}).get("bos", True)
            if (
                (self.add_bos if add_bos is None else add_bos)
                and own_bos
                and bos is not None
                and bos >= 0
            ):
                ids = [bos] + ids
            return ids
        return [int(t) for t in prompt]

    def generate(
        self,
        prompts,
        params: SamplingParams | list[SamplingParams] = SamplingParams(),  # noqa: B008 - frozen, never mutated
        *,
        speculative: bool = False,
        on_chunk=None,
    ) -> list[Completion]:
        """Completes each prompt (text or token ids). params: one for all, or one per prompt.

        on_chunk(tokens, done): called between decode chunks with each row's tokens so far and
        whether it is done (a streaming server sends text from it); giving it makes decoding
        chunked.
        """
        if not prompts:
            return []
        encoded = [self.encode(p) for p in prompts]
        B = len(encoded)
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * B
        if len(plist) != B:
            raise ValueError(f"{len(plist)} sampling params for {B} prompts")
        if any(len(e) == 0 for e in encoded):
            raise ValueError(
                "empty prompt: give at least one token (e.g. add_bos=True with a BOS token)"
            )
        if speculative and not self.cfg.mtp_depth:
            raise ConfigError(
                "speculative decoding drafts with the MTP head; this model has model.mtp_depth=0"
            )
        if speculative and self.record_routes:
            raise ValueError(
                "record_routes: not with speculative decoding (a verified draft's routing is not "
                "kept)"
            )
        n_real = B
        stats = Stats(prompt_tokens=sum(len(e) for e in encoded))
        # shapes compile in buckets: rows padded to a power of two with rows that finish at once,
        # the output buffer to _bucket(max_new_tokens), prompts to _bucket(length); a server sees
        # few distinct programs
        B = 1 << (B - 1).bit_length()
        encoded = encoded + [encoded[0][:1]] * (B - n_real)
        plist = plist + [SamplingParams(max_new_tokens=1)] * (B - n_real)
        lengths = np.array([len(e) for e in encoded], np.int32)
        max_new = _bucket(max(p.max_new_tokens for p in plist))
        T = _bucket(int(lengths.max()))
        need = max(len(e) + p.max_new_tokens for e, p in zip(encoded, plist))  # the longest row
        limit = self.cfg.max_position_embeddings
        if need > limit:
            i = max(range(B), key=lambda i: len(encoded[i]) + plist[i].max_new_tokens)
            raise ValueError(
                f"prompt ({len(encoded[i])} tokens) + max_new_tokens ({plist[i].max_new_tokens}) "
                f"exceeds model.max_position_embeddings={limit}"
            )
        # (+2: a speculative step writes two positions; writes past the end are dropped, never kept)
        max_len = min(_round_up(need + 2, 64), limit)
        tokens = np.zeros((B, T), np.int32)
        for i, e in enumerate(encoded):
            tokens[i, : len(e)] = e
        rows = sampling.rows(plist)
        penalty = bool(np.any(rows["penalty"] != 1.0))
        mode = sampling.mode(plist)

        t0 = time.perf_counter()
        carry = self._prefill(
            self.state,
            jnp.asarray(tokens),
            jnp.asarray(lengths),
            rows,
            jnp.asarray(self.eos_ids),
            max_len=max_len,
            max_new=max_new,
            spec=speculative,
            penalty=penalty,
            mode=mode,
        )
        jax.block_until_ready(carry["n_out"])
        stats.prefill_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        checks = any(p.stop for p in plist) or self.safety is not None or on_chunk is not None
        checked = [0] * B  # text length each row's safety classifier has seen
        flags = [[] for _ in range(B)]  # classifier spans per row
        while True:
            n = (
                self.chunk if checks else max_new
            )  # (the while loop also ends when every row is done)
            carry = self._decode(
                self.state,
                carry,
                rows,
                jnp.asarray(self.eos_ids),
                jnp.int32(n),
                spec=speculative,
                penalty=penalty,
                mode=mode,
            )
            done = np.asarray(carry["done"])
            if (
                checks
                and not done.all()
                and (self.safety is not None or any(p.stop for p in plist))
            ):
                hit = self._host_checks(carry, plist, done, checked, flags)
                if hit.any():
                    carry["done"] = jnp.asarray(done | hit)
                    done = done | hit
            if on_chunk is not None:
                out, n_out = np.asarray(carry["out"]), np.asarray(carry["n_out"])
                on_chunk(
                    [out[i, : n_out[i]].tolist() for i in range(n_real)], done[:n_real].tolist()
                )
            if done.all():
                break
        out, logp, n_out = (np.asarray(carry[k]) for k in ("out", "logp", "n_out"))
        stats.decode_seconds = time.perf_counter() - t0
        stats.steps = int(carry["steps"])
        stats.drafted, stats.accepted = int(carry["drafted"].sum()), int(carry["accepted"].sum())
        results = [
            self._finish(
                encoded[i], out[i, : n_out[i]], logp[i, : n_out[i]], plist[i], checked[i], flags[i]
            )
            for i in range(n_real)
        ]
        if self.record_routes:
            routes = [np.asarray(seg["route"]) for seg in carry["cache"].segments if "route" in seg]
            routes = np.concatenate(routes) if routes else None  # [L_moe, B, S, K]
            for i, c in enumerate(results):
                n = len(encoded[i]) + len(c.tokens) + (c.finish_reason == "eos")
                c.routes = None if routes is None else routes[:, i, :n].astype(np.int32)
        stats.generated_tokens = sum(len(c.tokens) for c in results)
        self.last_stats = stats
        return results

    def decode_text(self, ids) -> str:
        """Text of generated ids (EOS tokens left out)."""
        eos = set(self.eos_ids.tolist())
        return self.tokenizer.decode([int(t) for t in ids if int(t) not in eos])

    def _host_checks(self, carry, plist, done, checked, flags) -> np.ndarray:
        """Rows that a stop string or the safety filter ends now (text checked between chunks)."""
        if self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        out, n_out = np.asarray(carry["out"]), np.asarray(carry["n_out"])
        hit = np.zeros(len(plist), bool)
        for i, p in enumerate(plist):
            if done[i]:
                continue
            text = self.decode_text(out[i, : n_out[i]])
            hit[i] = any(s in text for s in p.stop)
            if self.safety is not None:
                flag = self.safety.classify(text, checked[i])
                if flag is not None:
                    flags[i].append(flag)
                checked[i] = len(text)
                hit[i] |= self.safety.stops(text, flags[i])
        return hit

    def _cut(self, toks, logp, chars: int):
        """The longest token prefix whose text fits in `chars` characters (text grows with the
        prefix)."""
        lo, hi = 0, len(toks)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(self.decode_text(toks[:mid])) <= chars:
                lo = mid
            else:
                hi = mid - 1
        return toks[:lo], logp[:lo]

    def _finish(
        self, prompt, toks, logp, p: SamplingParams, checked: int = 0, flags=()
    ) -> Completion:
        toks, logp = [int(t) for t in toks], [float(x) for x in logp]
        reason, eos_logp = "length", None
        if toks and toks[-1] in set(self.eos_ids.tolist()):
            toks, logp, reason, eos_logp = toks[:-1], logp[:-1], "eos", logp[-1]
        if self.tokenizer is None:
            return Completion(prompt, toks, logp, reason, eos_logprob=eos_logp)
        text = self.decode_text(toks)
        cut = min((text.find(s) for s in p.stop if s in text), default=-1)
        if cut >= 0:
            toks, logp = self._cut(toks, logp, cut)
            text, reason = text[:cut], "stop"
        counts = {}
        if self.safety is not None:
            last = self.safety.classify(text, checked)  # text generated after the last check
            filtered_text, counts, filtered = self.safety.apply(
                text, list(flags) + ([last] if last else [])
            )
            if filtered:
                if self.safety.action == "refuse":
                    toks, logp = [], []
                else:
                    toks, logp = self._cut(toks, logp, len(filtered_text))
                reason = "content_filter"
            text = filtered_text
        return Completion(
            prompt,
            toks,
            logp,
            reason,
            text,
            counts,
            eos_logprob=eos_logp if reason == "eos" else None,
        )

    # ------------------------------------------------------------------------------ device side

    def _model(self, state):
        model = nnx.merge(self.graphdef, state)
        from moejax.finetune import lora

        return lora.merge(model) if lora.has_adapters(model) else model

    def _prefill_fn(
        self, state, tokens, lengths, rows, eos, *, max_len, max_new, spec, penalty, mode
    ):
        model = self._model(state)
        cfg = self.cfg
        B, T = tokens.shape
        V = cfg.vocab_size
        cache = cache_lib.init_cache(
            cfg,
            B,
            max_len,
            dtype=self.cache_dtype,
            int8=self.kv_int8,
            mtp=spec,
            routes=self.record_routes,
        )
        real = jnp.arange(T)[None] < lengths[:, None]  # [B, T]
        h, cache = forward(
            model, tokens, cache, prefill=True, absorbed=self.absorbed, token_mask=real
        )
        if (
            self.record_routes
        ):  # the padding after each prompt was routed too: not a position of the row
            unwritten = (jnp.arange(max_len) >= lengths[:, None])[None, :, :, None]  # [1, B, S, 1]
            cache = cache._replace(
                segments=[
                    dict(s, route=jnp.where(unwritten, -1, s["route"])) if "route" in s else s
                    for s in cache.segments
                ]
            )
        cache = cache._replace(lengths=lengths)
        last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)  # [B, 1, D]
        raw = model.head(last)[:, 0]  # [B, V]
        logits = raw
        presence = None
        if penalty:
            presence = jnp.zeros((B, V), bool).at[jnp.arange(B)[:, None], tokens].max(real)
            logits = sampling.penalize(logits, presence, rows["penalty"])
        first = sampling.choose(sampling.keys(rows["seed"], lengths), logits, rows, mode)
        carry = {
            "cache": cache,
            "last": first,
            "out": jnp.zeros((B, max_new), jnp.int32).at[:, 0].set(first),
            "logp": jnp.zeros((B, max_new), jnp.float32)
            .at[:, 0]
            .set(sampling.token_logprob(raw, first)),
            "n_out": jnp.ones((B,), jnp.int32),
            "done": jnp.isin(first, eos) | (rows["max_new"] <= 1),
            "steps": jnp.zeros((), jnp.int32),
            "drafted": jnp.zeros((B,), jnp.int32),
            "accepted": jnp.zeros((B,), jnp.int32),
        }
        if penalty:
            carry["presence"] = presence.at[jnp.arange(B), first].set(True)
        if spec:
            # MTP over the prompt: position i pairs h_i with token i + 1 (the sampled token after
            # the last)
            nxt = jnp.concatenate([tokens[:, 1:], jnp.zeros((B, 1), tokens.dtype)], axis=1)
            nxt = nxt.at[jnp.arange(B), lengths - 1].set(first)
            hm, cache = mtp_forward(
                model,
                h,
                nxt,
                carry["cache"],
                jnp.zeros_like(lengths),
                prefill=True,
                absorbed=self.absorbed,
            )
            carry["cache"] = cache
            m_last = jnp.take_along_axis(hm, (lengths - 1)[:, None, None], axis=1)
            carry.update(
                self._draft(model, m_last[:, 0], rows, carry.get("presence"), lengths + 1, mode)
            )
        return carry

    def _draft(self, model, mtp_hidden, rows, presence, position, mode):
        """The MTP draft for the token at `position` [B] and its distribution q."""
        logits = model.head(mtp_hidden[:, None])[:, 0]
        if presence is not None:
            logits = sampling.penalize(logits, presence, rows["penalty"])
        q = sampling.distribution(logits, rows, mode)
        draft = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        if mode != "greedy":
            drawn = sampling.draw(sampling.keys(rows["seed"], position, salt=3), q)
            draft = jnp.where(rows["temperature"] > 0, drawn, draft).astype(jnp.int32)
        return {"draft": draft, "q": q}

    def _decode_fn(self, state, carry, rows, eos, n, *, spec, penalty, mode):
        model = self._model(state)
        step = self._spec_step if spec else self._plain_step

        def cond(c):
            i, c = c
            return (i < n) & ~jnp.all(c["done"])

        def body(c):
            i, c = c
            c = step(model, c, rows, eos, penalty, mode)
            return i + 1, c | {"steps": c["steps"] + 1}

        return jax.lax.while_loop(cond, body, (jnp.int32(0), carry))[1]

    @staticmethod
    def _emit(c, tok, logp, mask, rows, eos):
        """Appends tok [B] to the rows in mask; updates done/last/presence."""
        B = tok.shape[0]
        col = jnp.minimum(c["n_out"], c["out"].shape[1] - 1)
        c = dict(c)
        c["out"] = (
            c["out"].at[jnp.arange(B), col].set(jnp.where(mask, tok, c["out"][jnp.arange(B), col]))
        )
        c["logp"] = (
            c["logp"]
            .at[jnp.arange(B), col]
            .set(jnp.where(mask, logp, c["logp"][jnp.arange(B), col]))
        )
        c["n_out"] = c["n_out"] + mask
        c["done"] = c["done"] | (mask & (jnp.isin(tok, eos) | (c["n_out"] >= rows["max_new"])))
        c["last"] = jnp.where(mask, tok, c["last"])
        if "presence" in c:
            c["presence"] = c["presence"].at[jnp.arange(B), tok].max(mask)
        return c

    def _plain_step(self, model, c, rows, eos, penalty, mode):
        cache = c["cache"]
        active = ~c["done"]
        h, cache = forward(model, c["last"][:, None], cache, absorbed=self.absorbed)
        raw = model.head(h)[:, 0]  # [B, V]
        logits = sampling.penalize(raw, c["presence"], rows["penalty"]) if penalty else raw
        position = cache.lengths + 1  # the position of the token drawn now
        tok = sampling.choose(sampling.keys(rows["seed"], position), logits, rows, mode)
        c = c | {"cache": cache._replace(lengths=cache.lengths + active)}
        return self._emit(c, tok, sampling.token_logprob(raw, tok), active, rows, eos)

    def _spec_step(self, model, c, rows, eos, penalty, mode):
        """Verify the draft and decode the next token in one forward of two positions, then draft
        again."""
        cache = c["cache"]
        start = cache.lengths  # position of c['last']
        active = ~c["done"]
        h, cache = forward(
            model, jnp.stack([c["last"], c["draft"]], axis=1), cache, absorbed=self.absorbed
        )
        raw = model.head(h)  # [B, 2, V]: logits for positions start + 1 and start + 2
        presence = c.get("presence")
        l0 = sampling.penalize(raw[:, 0], presence, rows["penalty"]) if penalty else raw[:, 0]
        p = sampling.distribution(l0, rows, mode)
        accept, y1 = sampling.speculative_accept(
            sampling.keys(rows["seed"], start + 1, salt=1),
            sampling.keys(rows["seed"], start + 1, salt=2),
            p,
            c["q"],
            c["draft"],
            rows["temperature"] <= 0,
            all_greedy=mode == "greedy",
        )
        c = c | {"cache": cache}
        c = self._emit(c, y1, sampling.token_logprob(raw[:, 0], y1), active, rows, eos)
        l1 = sampling.penalize(raw[:, 1], c["presence"], rows["penalty"]) if penalty else raw[:, 1]
        y2 = sampling.choose(sampling.keys(rows["seed"], start + 2), l1, rows, mode)
        second = active & accept & ~c["done"]
        c = self._emit(c, y2, sampling.token_logprob(raw[:, 1], y2), second, rows, eos)
        # the MTP depth's entries for positions start (h, y1) and start + 1 (h, y2); the draft comes
        # from the last one that is kept
        hm, cache = mtp_forward(
            model, h, jnp.stack([y1, y2], axis=1), c["cache"], start, absorbed=self.absorbed
        )
        m = jnp.where(second[:, None], hm[:, 1], hm[:, 0])
        n_new = active.astype(jnp.int32) + second
        c = c | {
            "cache": cache._replace(lengths=start + n_new),
            "drafted": c["drafted"] + active,
            "accepted": c["accepted"] + (active & accept),
        }
        c.update(self._draft(model, m, rows, c.get("presence"), start + n_new + 1, mode))
        return c
