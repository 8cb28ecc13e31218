"""llama.cpp in-process, through llama-cpp-python.

Generation drives ``Llama.generate`` directly instead of ``create_completion``: pieces come
from ``llama_token_to_piece`` (what llama.cpp's own server streams), stop strings are
matched incrementally, and the loop checks the cancel flag between tokens. While a prompt
is evaluated, llama.cpp's abort callback checks it within the batch as well.

Embeddings use a second small context on the same weights, so nothing is loaded twice. A
decoder model computes logits for every token of an embedding batch (2 MiB a token for
Gemma 3), so inputs are evaluated in batches sized from ``embedding_memory``, and the
per-token vectors are mean-pooled here.

One class for one model: every method drives the same llama.cpp handles (model, context,
vocabulary, the embedding context) from one worker thread, so they stay together; the
library's import, facts and abort hook are in ``llama_lib.py``, the FIM prompt layout in
``fim.py``, stop matching in ``stops.py``.
"""

from __future__ import annotations

import codecs
import ctypes
import gc
import logging
import random
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..models.gguf_info import GGUFInfo
from .base import (
    FINISH_CANCELLED,
    FINISH_LENGTH,
    FINISH_STOP,
    Cancelled,
    ContextLengthError,
    Embeddings,
    EngineError,
    FimUnsupported,
    GenerationResult,
    InvalidTokens,
    SamplingParams,
    embedding_batch,
)
from .chat_format import ChatFormatError, ChatFormatter
from .fim import TOKEN_NULL, FimTokens, InfillInput, InfillLimits, InfillResult, infill_prompt
from .llama_lib import (
    AbortHook,
    LlamaCppUnavailable,
    LoadOptions,
    engine_facts,
    import_llama_cpp,
)
from .stops import StopMatcher

log = logging.getLogger("mloffload.engine")

EMBED_CTX_MAX = 2048


class LlamaCppEngine:
    """One loaded GGUF model. Not thread-safe: one worker thread drives it."""

    def __init__(self, model_id: str, info: GGUFInfo, options: LoadOptions) -> None:
        llama_cpp = import_llama_cpp()
        self._lib = llama_cpp
        self.model_id = model_id
        self.path = info.path
        self.options = options
        self._info = info
        n_ctx = options.n_ctx
        if info.context_length:
            n_ctx = min(n_ctx, info.context_length)
        started = time.monotonic()
        try:
            self._llm = llama_cpp.Llama(
                model_path=info.path,
                n_ctx=n_ctx,
                n_batch=min(512, n_ctx),
                n_threads=options.n_threads or None,
                n_threads_batch=options.n_threads or None,
                n_gpu_layers=options.n_gpu_layers,
                main_gpu=options.main_gpu,
                flash_attn=options.flash_attn,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise EngineError(f"llama.cpp could not load {info.path}: {exc}") from exc
        self.load_seconds = time.monotonic() - started
        self.n_ctx: int = int(self._llm.n_ctx())
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm._model.model)
        self._piece_buf = ctypes.create_string_buffer(256)
        model = self._llm._model
        bos = model.token_get_text(self._llm.token_bos()) if self._llm.token_bos() >= 0 else ""
        eos = model.token_get_text(self._llm.token_eos()) if self._llm.token_eos() >= 0 else ""
        self.formatter = ChatFormatter(info.chat_template, info.architecture, bos, eos)
        self._stop_cache: dict[tuple[str, ...], tuple[frozenset[int], tuple[str, ...]]] = {}
        self._abort = AbortHook(llama_cpp, self._llm._ctx.ctx)
        self._max_piece = 0  # bytes of the longest token, once a long text needed it
        self._embed_ctx: Any = None
        self._embed_batch: Any = None
        self._embed_abort: AbortHook | None = None
        self._closed = False
        log.info(
            "loaded %s (%s, n_ctx=%d, n_gpu_layers=%d, chat format %s) in %.2fs",
            model_id, info.path, self.n_ctx, options.n_gpu_layers, self.formatter.name,
            self.load_seconds,
        )

    # --- prompts ------------------------------------------------------------------

    def _max_piece_bytes(self) -> int:
        if not self._max_piece:
            lib, buf = self._lib, ctypes.create_string_buffer(1024)
            self._max_piece = max(
                abs(lib.llama_token_to_piece(self._vocab, t, buf, 1024, 0, True))
                for t in range(lib.llama_vocab_n_tokens(self._vocab))) or 1
        return self._max_piece

    def _tokenize(self, text: str, limit: int, param: str) -> list[int]:
        """The tokens of ``text``; ContextLengthError at once when its size alone says it
        has more than ``limit`` (no token holds more than the vocabulary's longest piece),
        so a megabyte-long prompt is refused without seconds of tokenizing."""
        data = text.encode("utf-8")
        if len(data) >= limit:
            at_least = -(-len(data) // self._max_piece_bytes()) + 1  # and the BOS token
            if at_least > limit:
                raise self._too_long(f"at least {at_least}", limit, param)
        tokens: list[int] = self._llm.tokenize(data, add_bos=True, special=True)
        return tokens

    def _too_long(self, n_tokens: str, limit: int, param: str) -> ContextLengthError:
        if param.startswith("input"):
            return ContextLengthError(
                f"{param} has {n_tokens} tokens; embeddings take at most {limit}", "input")
        return ContextLengthError(
            f"This model's maximum context length is {limit} tokens, but the prompt has "
            f"{n_tokens} tokens. Shorten the {param}.", param)
    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = False
                 ) -> list[int]:
        """``common_tokenize``: BOS (and EOS) only with ``add_special``."""
        if not text:
            return []
        tokens: list[int] = self._llm.tokenize(text.encode("utf-8"), add_bos=add_special,
                                               special=parse_special)
        return tokens

    def check_ids(self, tokens: Sequence[int], param: str = "tokens") -> None:
        """InvalidTokens unless every id is in the vocabulary."""
        n = int(self._lib.llama_vocab_n_tokens(self._vocab))
        bad = next((t for t in tokens if not 0 <= t < n), None)
        if bad is not None:
            raise InvalidTokens(f"Token id {bad} is not in this model's vocabulary "
                                f"(0 to {n - 1}).", param)

    def detokenize(self, tokens: Sequence[int], special: bool = True) -> str:
        """``common_detokenize``: the text of ``tokens``, special ones written out."""
        if not tokens:
            return ""
        self.check_ids(tokens)
        arr = (self._lib.llama_token * len(tokens))(*tokens)
        size = max(256, 8 * len(tokens))
        for _ in range(2):
            buf = ctypes.create_string_buffer(size)
            n = self._lib.llama_detokenize(self._vocab, arr, len(tokens), buf, size, False,
                                           special)
            if n >= 0:
                return buf.raw[:n].decode("utf-8", "replace")
            size = -n
        raise EngineError("detokenize failed")

    def piece(self, token: int) -> bytes:
        """One token's text as llama-server's /tokenize pieces show it."""
        self.check_ids((token,), "content")
        n = self._lib.llama_token_to_piece(self._vocab, token, self._piece_buf, 256, 0, True)
        return self._piece_buf.raw[:max(0, n)]

    def fim_tokens(self) -> FimTokens:
        lib, vocab = self._lib, self._vocab
        return FimTokens(pre=lib.llama_vocab_fim_pre(vocab), suf=lib.llama_vocab_fim_suf(vocab),
                         mid=lib.llama_vocab_fim_mid(vocab), rep=lib.llama_vocab_fim_rep(vocab),
                         sep=lib.llama_vocab_fim_sep(vocab))

    def _bos_added(self) -> int | None:
        if self._lib.llama_vocab_get_add_bos(self._vocab):
            bos = int(self._lib.llama_vocab_bos(self._vocab))
            return bos if bos != TOKEN_NULL else None
        return None

    def _chat_tokens(self, messages: Sequence[dict[str, Any]]) -> tuple[list[int], tuple[str, ...]]:
        try:
            prompt = self.formatter.render(messages)
        except ChatFormatError as exc:
            raise EngineError(str(exc)) from exc
        return self._tokenize(prompt.text, self.n_ctx, "messages"), prompt.stop

    def _stop_tokens(self, stops: tuple[str, ...]) -> tuple[frozenset[int], tuple[str, ...]]:
        """Split end-of-turn markers into special-token ids and plain stop strings.

        Control tokens render as nothing, so a marker that is one special token can only be
        caught by its id.
        """
        cached = self._stop_cache.get(stops)
        if cached is not None:
            return cached
        ids: set[int] = set()
        texts: list[str] = []
        for s in stops:
            toks = self._llm.tokenize(s.encode("utf-8"), add_bos=False, special=True)
            if len(toks) == 1 and self._lib.llama_vocab_is_control(self._vocab, toks[0]):
                ids.add(toks[0])
            else:
                texts.append(s)
        self._stop_cache[stops] = (frozenset(ids), tuple(texts))
        return self._stop_cache[stops]

    # --- generation ---------------------------------------------------------------

    def chat(
        self,
        messages: Sequence[dict[str, Any]],
        params: SamplingParams,
        result: GenerationResult,
        cancel: threading.Event,
    ) -> Iterator[str]:
        tokens, template_stops = self._chat_tokens(messages)
        return self._generate(tokens, params, template_stops, result, cancel, "messages")

    def complete(
        self,
        prompt: str,
        params: SamplingParams,
        result: GenerationResult,
        cancel: threading.Event,
    ) -> Iterator[str]:
        tokens = self._tokenize(prompt, self.n_ctx, "prompt")
        return self._generate(tokens, params, (), result, cancel, "prompt")

    def generate_tokens(
        self,
        tokens: Sequence[int],
        params: SamplingParams,
        result: GenerationResult,
        cancel: threading.Event,
        *,
        samplers: tuple[str, ...] | None = None,
        cache_prompt: bool = True,
        param: str = "prompt",
    ) -> Iterator[str]:
        """Generate after a prompt given as token ids. ``samplers`` runs llama-server's
        sampler chain in that order (its ``samplers`` field) instead of llama-cpp-python's;
        ``cache_prompt`` False evaluates the whole prompt afresh."""
        self.check_ids(tokens, param)
        if not cache_prompt:
            self._llm.reset()
        return self._generate(list(tokens), params, (), result, cancel, param, samplers)

    def infill(
        self,
        inp: InfillInput,
        params: SamplingParams,
        result: InfillResult,
        cancel: threading.Event,
    ) -> Iterator[str]:
        """llama-server's /infill: its prompt layout, sampler chain and stop rules."""
        fim = self.fim_tokens()
        if not fim.usable:
            raise FimUnsupported(f"Infill is not supported by this model: "
                                 f"{', '.join(fim.missing)} missing")
        for param in ("input_prefix", "input_suffix"):
            given = getattr(inp, param)
            if not isinstance(given, str):
                self.check_ids([t for t in given if isinstance(t, int)], param)
        tokens = infill_prompt(self.tokenize_special, fim, self._bos_added(), inp, self.n_ctx)
        result.prompt = self.detokenize(tokens)
        result.token_ids = []
        pieces = self.generate_tokens(tokens, params, result, cancel, samplers=inp.samplers,
                                      cache_prompt=inp.cache_prompt, param="input_prefix")
        return self._limited(pieces, InfillLimits(inp.n_indent, inp.t_max_predict_ms), result)

    def tokenize_special(self, text: str, parse_special: bool) -> list[int]:
        return self.tokenize(text, False, parse_special)

    @staticmethod
    def _limited(pieces: Iterator[str], limits: InfillLimits, result: InfillResult
                 ) -> Iterator[str]:
        try:
            for piece in pieces:
                stop = limits.feed(piece, result.prompt_done_at)
                result.content = limits.text
                result.has_new_line = limits.has_new_line
                yield piece
                if stop:
                    result.limited = True
                    break
        finally:
            pieces.close()  # type: ignore[attr-defined]
            result.content = limits.text
            result.has_new_line = limits.has_new_line
            if result.limited:
                result.finish_reason = FINISH_LENGTH

    def _budget(self, n_prompt: int, max_tokens: int | None, param: str) -> int:
        left = self.n_ctx - n_prompt
        if left <= 0:
            raise self._too_long(str(n_prompt), self.n_ctx, param)
        return left if max_tokens is None else min(max_tokens, left)

    def _generate(
        self,
        tokens: list[int],
        params: SamplingParams,
        template_stops: tuple[str, ...],
        result: GenerationResult,
        cancel: threading.Event,
        param: str,
        samplers: tuple[str, ...] | None = None,
    ) -> Iterator[str]:
        budget = self._budget(len(tokens), params.max_tokens, param)
        result.prompt_tokens = len(tokens)
        result.truncated = False
        context_bound = params.max_tokens is None or params.max_tokens >= self.n_ctx - len(tokens)
        return self._stream(tokens, params, template_stops, budget, result, cancel, samplers,
                            context_bound)

    def _cached_prefix(self, tokens: list[int]) -> int:
        """Prompt tokens ``Llama.generate`` will reuse from the cache (its own rule)."""
        llm = self._llm
        n = int(llm.n_tokens)
        if n == 0:
            return 0
        common = 0
        for a, b in zip(llm.input_ids[:n].tolist(), tokens, strict=False):
            if a != b:
                break
            common += 1
        if common == len(tokens):
            exact = n == len(tokens) and not getattr(llm, "_requires_eval", True)
            return common if exact else common - 1
        return common

    def _sampler_chain(self, names: tuple[str, ...], params: SamplingParams, seed: int
                       ) -> Any:
        """llama-server's chain (common/sampling.cpp) for ``names``, then ``dist``."""
        from llama_cpp import _internals as internals

        lib = self._lib
        chain = internals.LlamaSampler()  # type: ignore[no-untyped-call]
        made = {
            "penalties": lambda: lib.llama_sampler_init_penalties(
                lib.llama_vocab_n_tokens(self._vocab), 64, params.repeat_penalty,
                params.frequency_penalty, params.presence_penalty),
            "top_n_sigma": lambda: lib.llama_sampler_init_top_n_sigma(-1.0),
            "top_k": lambda: lib.llama_sampler_init_top_k(params.top_k),
            "typ_p": lambda: lib.llama_sampler_init_typical(1.0, 0),
            "top_p": lambda: lib.llama_sampler_init_top_p(params.top_p, 0),
            "min_p": lambda: lib.llama_sampler_init_min_p(params.min_p, 0),
            "xtc": lambda: lib.llama_sampler_init_xtc(0.0, 0.1, 0, seed),
            "temperature": lambda: lib.llama_sampler_init_temp_ext(params.temperature, 0.0, 1.0),
            "infill": lambda: lib.llama_sampler_init_infill(self._vocab),
        }
        # dry and adaptive_p are off at llama-server's defaults (multiplier 0, target -1).
        for name in names:
            if name in made:
                lib.llama_sampler_chain_add(chain.sampler, made[name]())
        lib.llama_sampler_chain_add(chain.sampler, lib.llama_sampler_init_dist(seed))
        return chain

    def _stream(
        self,
        tokens: list[int],
        params: SamplingParams,
        template_stops: tuple[str, ...],
        budget: int,
        result: GenerationResult,
        cancel: threading.Event,
        samplers: tuple[str, ...] | None = None,
        context_bound: bool = False,
    ) -> Iterator[str]:
        llm, lib, vocab, buf = self._llm, self._lib, self._vocab, self._piece_buf
        stop_ids, template_texts = self._stop_tokens(template_stops)
        stops = StopMatcher(tuple(params.stop) + template_texts)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        seed = params.seed if params.seed is not None else random.getrandbits(31)
        llm.set_seed(seed)
        if params.seed is not None:
            # A seed promises the same answer for the same request. Reusing the cached
            # prefix of an earlier prompt would evaluate only the rest, in a batch of
            # another shape, and on some CPUs (AVX-512 kernels) that changes the logits
            # in their last bits: enough to sample another token at temperature 1. A
            # seeded request therefore evaluates its whole prompt afresh.
            llm.reset()
        if budget == 0:
            result.finish_reason = FINISH_LENGTH
            return
        result.cached_tokens = self._cached_prefix(tokens)
        result.started_at = time.monotonic()
        if samplers is not None:
            chain = self._sampler_chain(samplers, params, seed)
            llm._init_sampler = lambda **_: chain  # type: ignore[method-assign]
        gen = llm.generate(
            tokens,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            temp=params.temperature,
            repeat_penalty=params.repeat_penalty,
            frequency_penalty=params.frequency_penalty,
            presence_penalty=params.presence_penalty,
        )
        finish = FINISH_LENGTH
        produced = 0
        abort = self._abort
        abort.arm(cancel)  # the generator's first step evaluates the prompt
        ids = result.token_ids
        try:
            for token in gen:
                abort.disarm()
                now = time.monotonic()
                if result.prompt_done_at is None:
                    result.prompt_done_at = now
                result.last_token_at = now
                if cancel.is_set():
                    finish = FINISH_CANCELLED
                    break
                if token in stop_ids or lib.llama_vocab_is_eog(vocab, token):
                    finish = FINISH_STOP
                    result.eog = True
                    break
                produced += 1
                result.completion_tokens = produced
                if ids is not None:
                    ids.append(token)
                n = lib.llama_token_to_piece(vocab, token, buf, 256, 0, False)
                if n > 0:
                    text = decoder.decode(buf.raw[:n])
                    if text:
                        out = stops.feed(text)
                        if out:
                            yield out
                        if stops.stopped:
                            finish = FINISH_STOP
                            result.stop_word = stops.word
                            break
                if produced >= budget:
                    result.truncated = context_bound
                    break
                if cancel.is_set():
                    finish = FINISH_CANCELLED
                    break
        except RuntimeError:  # llama_decode returned 2: aborted within the prompt
            if not cancel.is_set():
                raise
            finish = FINISH_CANCELLED
        finally:
            abort.disarm()
            gen.close()
            if samplers is not None:
                del llm._init_sampler  # the next generation builds its own chain again
            result.kv_tokens = int(llm.n_tokens)
            result.finish_reason = finish
        if finish != FINISH_CANCELLED and not stops.stopped:
            tail = stops.feed(decoder.decode(b"", final=True)) + stops.flush()
            if tail:
                yield tail

    # --- embeddings ---------------------------------------------------------------

    def _embedding_context(self) -> tuple[Any, Any, int, int, AbortHook]:
        """The embedding context: its batch, the longest input and the batch size. Inputs
        longer than a batch take several, which needs causal attention; a model without it
        (a BERT-style encoder) gets one batch as long as the longest input."""
        if self._embed_ctx is None:
            longest = min(self.n_ctx, EMBED_CTX_MAX)
            size = embedding_batch(self.options.embedding_memory, self._llm.n_vocab(), longest)
            ctx = self._new_embedding_context(longest, size)
            if size < longest and not self._causal(ctx):
                ctx.close()
                size = longest
                ctx = self._new_embedding_context(longest, size)
            from llama_cpp import _internals as internals

            self._embed_ctx = ctx
            self._embed_batch = internals.LlamaBatch(n_tokens=size, embd=0, n_seq_max=1,
                                                     verbose=False)
            self._embed_abort = AbortHook(self._lib, ctx.ctx)
            self._embed_limits = (longest, size)
            log.debug("embedding context for %s: inputs up to %d tokens, batches of %d",
                      self.model_id, longest, size)
        assert self._embed_abort is not None
        return self._embed_ctx, self._embed_batch, *self._embed_limits, self._embed_abort

    def _new_embedding_context(self, n_ctx: int, batch: int) -> Any:
        from llama_cpp import _internals as internals

        lib = self._lib
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = batch
        params.n_ubatch = batch
        params.n_seq_max = 1
        params.embeddings = True
        params.pooling_type = lib.LLAMA_POOLING_TYPE_NONE  # pooled here, across batches
        threads = self.options.n_threads or self._llm.context_params.n_threads
        params.n_threads = threads
        params.n_threads_batch = threads
        return internals.LlamaContext(model=self._llm._model, params=params, verbose=False)

    def _causal(self, ctx: Any) -> bool:
        # Not wrapped by llama-cpp-python 0.3.36; declared in llama.h.
        fn = self._lib.llama_cpp._lib.llama_get_causal_attn
        fn.argtypes, fn.restype = [ctypes.c_void_p], ctypes.c_bool
        return bool(fn(ctx.ctx))

    def embed(self, texts: Sequence[str], cancel: threading.Event | None = None
              ) -> Embeddings:
        cancel = cancel or threading.Event()
        ctx, batch, longest, size, abort = self._embedding_context()
        n_embd = self._llm.n_embd()
        vectors: list[list[float]] = []
        total = 0
        abort.arm(cancel)
        try:
            for i, text in enumerate(texts):
                tokens = self._tokenize(text, longest, f"input[{i}]")
                if len(tokens) > longest:
                    raise self._too_long(str(len(tokens)), longest, f"input[{i}]")
                total += len(tokens)
                ctx.kv_cache_clear()
                acc = np.zeros(n_embd, dtype=np.float64)
                for start in range(0, len(tokens), size):
                    if cancel.is_set():
                        raise Cancelled(f"embedding stopped at input {i} of {len(texts)}")
                    chunk = tokens[start:start + size]
                    batch.set_batch(chunk, start, True)
                    try:
                        ctx.decode(batch)
                    except RuntimeError:
                        if cancel.is_set():
                            raise Cancelled(f"embedding stopped at input {i} of "
                                            f"{len(texts)}") from None
                        raise
                    raw = self._lib.llama_get_embeddings(ctx.ctx)
                    acc += np.ctypeslib.as_array(raw, shape=(len(chunk) * n_embd,)).reshape(
                        len(chunk), n_embd).sum(axis=0, dtype=np.float64)
                norm = float(np.linalg.norm(acc)) or 1.0
                vectors.append((acc / norm).tolist())
        finally:
            abort.disarm()
            ctx.kv_cache_clear()
        return Embeddings(vectors, total)

    # --- facts and lifecycle --------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return {
            "model": self.model_id,
            "path": self.path,
            "n_ctx": self.n_ctx,
            "n_gpu_layers": self.options.n_gpu_layers,
            "n_threads": self._llm.context_params.n_threads,
            "chat_format": self.formatter.name,
            "n_embd": self._llm.n_embd(),
            "n_params": self._llm._model.n_params(),
            "model_bytes": self._llm._model.size(),
            "load_seconds": round(self.load_seconds, 3),
        }

    def close(self) -> None:
        """Free the weights and contexts now (not at some later garbage collection)."""
        if self._closed:
            return
        self._closed = True
        self._abort.disarm()
        if self._embed_batch is not None:
            self._embed_batch.close()
        if self._embed_ctx is not None:
            self._embed_ctx.close()
        self._embed_ctx = self._embed_batch = None
        self._llm.close()
        del self._llm
        gc.collect()


# Importers of the engine find the library's names here too.
__all__ = ["AbortHook", "LlamaCppEngine", "LlamaCppUnavailable", "LoadOptions", "engine_facts",
           "import_llama_cpp"]
