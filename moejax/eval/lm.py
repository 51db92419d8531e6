"""The model side of evaluation: log-likelihoods and greedy generations from a moejax Transformer.

lm-evaluation-harness's causal-LM backend (``HFLM``, lm-eval 0.4.12 and 0.4.13) defines what a
score is, and this module computes the same quantities on a moejax model:

- ``loglikelihood(context, continuation)``: the pair is tokenized by ``tasks.encode_pair`` (the
  context's trailing spaces move to the continuation, the whole string encoded once); an empty
  context is conditioned on the prefix token (BOS, else EOS); the input is the last
  ``max_length + 1`` tokens of context + continuation, less the final one; the result is the sum
  of the continuation tokens' log-probabilities and whether each is the greedy argmax.
- ``generate_until``: greedy decoding with the request's stop strings (and the tokenizer's
  end-of-text), through ``moejax.infer.Generator`` (KV cache, absorbed MLA).

Requests are deduplicated (a multiple-choice document's choices share their context; few-shot
contexts repeat across tasks) and batched by length: rows are sorted longest first, padded to a
multiple of ``pad_to`` tokens (few distinct shapes, so few compilations) and the padding is masked
with segment id 0, so a row's score does not depend on its batch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.eval import tasks as tasks_lib
from moejax.infer.generate import Generator, for_inference
from moejax.infer.sampling import SamplingParams


@functools.partial(jax.jit, static_argnums=0)
def _scores(graphdef, state, ids, segment_ids, pos, targets):
    """Log-probabilities of `targets` [B, C] at positions `pos` [B, C] of the rows `ids`, and
    whether each is the argmax. Only those C positions go through the LM head: a multiple-choice
    continuation is a few tokens of a long context, and the head (and its log-softmax over the
    vocabulary) would otherwise cost as much as the trunk. Jitted once per model structure (the
    graphdef is static), so every scorer of that structure shares the compiled programs."""
    model = nnx.merge(graphdef, state)
    _, aux = model(ids, segment_ids=segment_ids, return_hidden=True)  # logits: dead code
    h = jnp.take_along_axis(aux["hidden"], pos[..., None], axis=1)  # [B, C, D]
    logp = jax.nn.log_softmax(model.head(h).astype(jnp.float32), axis=-1)  # [B, C, V]
    chosen = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return chosen, jnp.argmax(logp, axis=-1) == targets


class ModelLM:
    """Scores and generates with a moejax Transformer and its tokenizer.

    Args:
      model: a moejax Transformer (one device or built for a mesh).
      tokenizer: encode/decode with bos_id / eos_id (moejax.data.tokenizer).
      batch_size: rows per forward pass of the log-likelihood requests.
      max_length: the longest input scored (default: the model's max_position_embeddings).
      pad_to: rows are padded to a multiple of this many tokens.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        batch_size: int = 16,
        max_length: int | None = None,
        pad_to: int = 64,
    ):
        if batch_size < 1 or pad_to < 1:
            raise ValueError(f"batch_size and pad_to must be >= 1, got {batch_size}, {pad_to}")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.pad_to = batch_size, pad_to
        self.max_length = max_length or model.cfg.max_position_embeddings
        bos, eos = getattr(tokenizer, "bos_id", -1), getattr(tokenizer, "eos_id", -1)
        self.prefix_id = bos if bos is not None and bos >= 0 else eos
        if self.prefix_id is None or self.prefix_id < 0:
            self.prefix_id = None  # an empty context cannot be scored (see _prefix)
        self.eos_id = eos if eos is not None and eos >= 0 else None
        self._cache: dict[tuple[tuple[int, ...], int], tuple[float, bool]] = {}
        self._graphdef, self._state = nnx.split(for_inference(model))
        self._generator = None

    def release(self) -> None:
        """Drop the references to the model's parameters (until the next set_model): a training
        run evaluates its state, then donates those buffers to the next step."""
        self._state, self.model = None, None
        if self._generator is not None:
            self._generator.state = None

    def set_model(self, model) -> None:
        """Score and generate with another model of the same structure (a training run's newer
        parameters): the compiled programs are reused; cached scores are dropped."""
        graphdef, state = nnx.split(for_inference(model))
        if graphdef != self._graphdef:
            raise ValueError("set_model: the model's structure differs from the one compiled for")
        self._state, self.model = state, model
        self._cache.clear()
        if self._generator is not None:
            self._generator.set_params(model)

    # ------------------------------------------------------------------ log-likelihoods

    def _prefix(self) -> int:
        if self.prefix_id is None:
            raise ValueError(
                "an empty context is conditioned on the BOS (or EOS) token; this tokenizer has none"
            )
        return self.prefix_id

    def _pair_tokens(self, context: str, continuation: str) -> tuple[list[int], int]:
        """(tokens of context + continuation, how many of them are the continuation)."""
        if context:
            ctx, cont = tasks_lib.encode_pair(context, continuation, self.tokenizer.encode)
        else:
            ctx, cont = [self._prefix()], list(self.tokenizer.encode(continuation))
        if not cont:
            raise ValueError(f"empty continuation after tokenization: {continuation!r}")
        return ctx + cont, len(cont)

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(sum of log P(continuation | context), whether greedy decoding gives it) per pair."""
        keyed = {}
        for pair in pairs:
            if pair not in keyed:
                keyed[pair] = self._pair_tokens(*pair)
        scored = dict(zip(keyed, self.loglikelihood_tokens(list(keyed.values()))))
        return [scored[p] for p in pairs]

    def loglikelihood_tokens(
        self, items: Sequence[tuple[Sequence[int], int]]
    ) -> list[tuple[float, bool]]:
        """The same on token ids: (tokens, n) scores the last n of the tokens given those before.

        lm-eval's ``_loglikelihood_tokens``: the input is the last ``max_length + 1`` tokens, less
        the final one. Results are cached by (tokens, n).
        """
        keys = [(tuple(int(t) for t in tokens), int(n)) for tokens, n in items]
        for tokens, n in keys:
            if not 1 <= n < len(tokens):
                raise ValueError(f"score the last {n} of {len(tokens)} tokens: need 1 <= n < len")
        # Requests whose inputs are identical share one row (HFLM does this for one-token
        # continuations): MMLU's four choices " A".." D" differ only in the token predicted after
        # the context, so the context runs once and each choice reads its own target there.
        rows: dict[tuple[int, ...], list] = {}
        for key in dict.fromkeys(k for k in keys if k not in self._cache):
            tokens = key[0][-(self.max_length + 1) :]  # lm-eval keeps the end of a long input
            n_cont = min(key[1], len(tokens) - 1)
            rows.setdefault(tokens[:-1], []).append((key, n_cont, tokens[len(tokens) - n_cont :]))
        ordered = sorted(rows.items(), key=lambda r: -len(r[0]))  # longest first
        for start in range(0, len(ordered), self.batch_size):
            batch = ordered[start : start + self.batch_size]
            T = -(-max(len(inp) for inp, _ in batch) // self.pad_to) * self.pad_to
            slots = max(sum(n for _, n, _ in reqs) for _, reqs in batch)
            C = max(8, 1 << (slots - 1).bit_length())
            B = self.batch_size  # one batch shape: fewer compilations
            ids = np.zeros((B, T), np.int32)
            seg = np.zeros((B, T), np.int32)
            pos = np.zeros((B, C), np.int32)
            targets = np.zeros((B, C), np.int32)
            spans = []
            for b, (inp, reqs) in enumerate(batch):
                n = len(inp)
                ids[b, :n], seg[b, :n] = inp, 1
                at = 0
                for key, n_cont, tgt in reqs:
                    pos[b, at : at + n_cont] = np.arange(n - n_cont, n)
                    targets[b, at : at + n_cont] = tgt
                    spans.append((key, b, slice(at, at + n_cont)))
                    at += n_cont
            chosen, greedy = jax.device_get(
                _scores(self._graphdef, self._state, *map(jnp.asarray, (ids, seg, pos, targets)))
            )
            for key, b, span in spans:
                self._cache[key] = (float(chosen[b, span].sum()), bool(greedy[b, span].all()))
        return [self._cache[k] for k in keys]

    def choice_loglikelihoods(self, requests: Sequence[tasks_lib.MCRequest]) -> list[list[float]]:
        """Each multiple-choice request's [C] log-likelihoods (what tasks.score takes)."""
        pairs = [(r.context, c) for r in requests for c in r.continuations]
        lls = iter(ll for ll, _ in self.loglikelihood(pairs))
        return [[next(lls) for _ in r.continuations] for r in requests]

    # ------------------------------------------------------------------ generation

    def complete(self, prompts: Sequence[str], params: Sequence[SamplingParams]) -> list[str]:
        """Each prompt's continuation text with its own sampling settings (stop strings cut it;
        the tokenizer's end-of-text ends it). A prompt too long for its budget keeps its end."""
        if not prompts:
            return []
        if self._generator is None:
            eos = [] if self.eos_id is None else [self.eos_id]
            self._generator = Generator(self.model, self.tokenizer, eos_ids=eos, add_bos=False)
        ids = []
        for prompt, p in zip(prompts, params):
            tokens = list(self.tokenizer.encode(prompt)) or [self._prefix()]
            budget = max(self.max_length - p.max_new_tokens, 1)
            ids.append(tokens[-budget:])
        outs = []
        for start in range(0, len(ids), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            outs += [o.text for o in self._generator.generate(ids[chunk], list(params[chunk]))]
        return outs

    def generate_until(self, requests: Sequence[tasks_lib.GenRequest]) -> list[str]:
        """Greedy continuations, cut at the request's stop strings (and end-of-text)."""
        params = [
            SamplingParams(max_new_tokens=r.max_gen_toks, stop=tuple(r.until)) for r in requests
        ]
        texts = self.complete([r.context for r in requests], params)
        return [tasks_lib.truncate_at_stop(t, r.until) for t, r in zip(texts, requests)]

    # ------------------------------------------------------------------ whole tasks

    def run(self, requests: Sequence[tasks_lib.MCRequest | tasks_lib.GenRequest]) -> list:
        """Each request's output in order: [C] log-likelihoods or a generated text."""
        mc = [r for r in requests if isinstance(r, tasks_lib.MCRequest)]
        gen = [r for r in requests if isinstance(r, tasks_lib.GenRequest)]
        by_id = dict(zip(map(id, mc), self.choice_loglikelihoods(mc)))
        by_id.update(zip(map(id, gen), self.generate_until(gen)))
        return [by_id[id(r)] for r in requests]
