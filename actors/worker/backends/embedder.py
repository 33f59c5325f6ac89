"""Embeddings of a loaded GGUF model: a second llama.cpp context on the same weights.

The generating context (the batching engine's) keeps its KV cache and slots; embeddings need a
context made with `embeddings = true` and a pooling type, so one is made on demand on the same
`llama_model` (the weights are shared, not loaded twice) and kept for the next request. Its KV
cache is `n_ctx` cells more, and its batch holds a whole input (llama.cpp pools a sequence
only when all of it is in one micro-batch, as llama-server requires of its inputs too).

Pooling is the model's own (an embedding model's GGUF names mean, CLS or last) and mean for a
model that names none or `none` (a generative model). Vectors are L2-normalised, as llama-server
answers `/v1/embeddings`, and come back as little-endian float32 bytes (OpenAI's base64 is
exactly those bytes).

Pure API over llama.cpp's low-level functions (`lib` is `llama_cpp.llama_cpp`); one thread
(the worker's loop) calls it.
"""

from __future__ import annotations

import ctypes
import math
import struct
from collections.abc import Sequence
from typing import Any

from actors.worker.backends import BackendError, BadRequest

__all__ = ["MAX_SEQUENCES", "Embedder", "pooling_of"]

MAX_SEQUENCES = 8
"""Inputs decoded together in one batch (each its own sequence) when they fit the context."""
_POOLED = (1, 2, 3)  # LLAMA_POOLING_TYPE_MEAN, _CLS, _LAST: those that give one vector per input
_MEAN = 1


def pooling_of(declared: str | None) -> int:
    """Return the llama.cpp pooling type to embed with, from the GGUF's `<arch>.pooling_type`.

    A model that declares mean, CLS or last pooling gets it; one that declares none, rank (a
    reranker's head) or nothing (a generative model) is mean-pooled, as llama-server's
    `--pooling mean` would.
    """
    if declared is not None and declared.strip().isdigit() and int(declared) in _POOLED:
        return int(declared)
    return _MEAN


class Embedder:
    """Embed token sequences with a loaded model; made once per worker, on the first request."""

    def __init__(
        self, lib: Any, model: Any, n_ctx: int, n_threads: int, pooling: int = _MEAN
    ) -> None:
        self._lib = lib
        self._vocab = lib.llama_model_get_vocab(model)
        self._n_ctx = n_ctx
        # The pooled vector's length: past a projection head it is n_embd_out, not n_embd.
        n_embd_out = getattr(lib, "llama_model_n_embd_out", lib.llama_model_n_embd)
        self._n_embd = n_embd_out(model)
        self._encoder_only = lib.llama_model_has_encoder(model) and not lib.llama_model_has_decoder(
            model
        )
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_ctx
        cparams.n_ubatch = n_ctx  # a whole input in one micro-batch: llama.cpp pools per ubatch
        cparams.n_seq_max = MAX_SEQUENCES
        cparams.kv_unified = True  # the batch's sequences share the n_ctx cells
        cparams.embeddings = True
        cparams.pooling_type = pooling
        cparams.no_perf = True
        if n_threads > 0:
            cparams.n_threads = cparams.n_threads_batch = n_threads
        ctx = lib.llama_init_from_model(model, cparams)
        if not ctx:
            raise BackendError(f"llama.cpp could not make an embeddings context of {n_ctx} tokens")
        self._ctx = ctx
        self._mem = lib.llama_get_memory(ctx)
        self._batch = lib.llama_batch_init(n_ctx, 0, 1)

    @property
    def n_embd(self) -> int:
        """Return the length of every vector."""
        return int(self._n_embd)

    @property
    def n_ctx(self) -> int:
        """Return the most tokens one input may have."""
        return self._n_ctx

    def tokenize(self, text: str) -> list[int]:
        """Tokenize `text` as llama-server does for embeddings: BOS and EOS/SEP as the model
        wants them, special tokens parsed."""
        lib, vocab = self._lib, self._vocab
        data = text.encode("utf-8")
        size = len(data) + 4
        while True:
            buf = (ctypes.c_int32 * size)()
            n = lib.llama_tokenize(vocab, data, len(data), buf, size, True, True)
            if n >= 0:
                break
            size = -n
        tokens = list(buf[:n])
        eos = lib.llama_vocab_sep(vocab) if lib.llama_vocab_get_add_sep(vocab) else -1
        if eos == -1 and lib.llama_vocab_get_add_eos(vocab):
            eos = lib.llama_vocab_eos(vocab)
        if eos != -1 and (not tokens or tokens[-1] != eos):
            tokens.append(eos)
        return tokens

    def embed(self, inputs: Sequence[Sequence[int]], field: str = "input") -> list[bytes]:
        """Return one L2-normalised vector per input, as little-endian float32 bytes.

        Raise BadRequest naming `field` (`input[i]` for a list) for an empty input, one longer
        than the context, or a token outside the vocabulary.
        """
        n_vocab = self._lib.llama_vocab_n_tokens(self._vocab)
        for i, tokens in enumerate(inputs):
            where = field if len(inputs) == 1 else f"{field}[{i}]"
            if not tokens:
                raise BadRequest(where, "is empty")
            if len(tokens) > self._n_ctx:
                raise BadRequest(
                    where, f"is {len(tokens)} tokens; the context holds {self._n_ctx}"
                )
            if any(not 0 <= t < n_vocab for t in tokens):
                raise BadRequest(where, f"a token id is outside the vocabulary of {n_vocab}")
        out: list[bytes] = []
        for group in _groups([len(t) for t in inputs], self._n_ctx, MAX_SEQUENCES):
            out.extend(self._decode([inputs[i] for i in group]))
        return out

    def _decode(self, inputs: list[Sequence[int]]) -> list[bytes]:
        lib, batch = self._lib, self._batch
        lib.llama_memory_clear(self._mem, True)
        n = 0
        for seq, tokens in enumerate(inputs):
            for pos, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = pos
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = True  # outputs: what llama.cpp pools over
                n += 1
        batch.n_tokens = n
        run = lib.llama_encode if self._encoder_only else lib.llama_decode
        rc = run(self._ctx, batch)
        if rc != 0:
            raise BackendError(f"llama.cpp's embedding decode returned {rc}")
        vectors = []
        for seq in range(len(inputs)):
            pooled = lib.llama_get_embeddings_seq(self._ctx, seq)
            if not pooled:
                raise BackendError("llama.cpp gave no pooled embedding")
            vectors.append(_normalised(pooled[: self._n_embd]))
        return vectors

    def close(self) -> None:
        """Free the context and its batch (the model is the engine's)."""
        if self._ctx is not None:
            self._lib.llama_batch_free(self._batch)
            self._lib.llama_free(self._ctx)
            self._ctx = None


def _groups(lengths: list[int], max_tokens: int, max_count: int) -> list[list[int]]:
    """Split input indexes, in order, into runs of at most `max_count` inputs and
    `max_tokens` tokens together."""
    groups: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, n in enumerate(lengths):
        if current and (used + n > max_tokens or len(current) == max_count):
            groups.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        groups.append(current)
    return groups


def _normalised(values: list[float]) -> bytes:
    """Scale to unit length (a zero vector stays zero), packed as float32 little-endian."""
    norm = math.sqrt(math.fsum(v * v for v in values))
    scale = 1.0 / norm if norm > 0.0 else 0.0
    return struct.pack(f"<{len(values)}f", *(v * scale for v in values))
