"""How a GGUF request samples: the llama.cpp samplers built from its parameters, and the draw.

Construction over llama.cpp's low-level API (`lib` is `llama_cpp.llama_cpp`): the engine builds
one chain per request at submit and frees it when the request ends. The chain holds the logit
bias and the penalties, then top-k, top-p, min-p, temperature and the draw (or greedy). A
`json_schema` becomes a GBNF grammar sampler kept apart from the chain and used as llama.cpp's
common sampler uses it: draw with the chain, check the one token drawn against the grammar,
and only when the grammar refuses it apply the grammar to every candidate and draw again. A
step the grammar agrees with then costs one token's check, not a pass over the vocabulary.
`python -m bench.grammar` (2-layer random models, one thread, 64 tokens; two alternated runs
on a shared 2-core machine): greedy at 128k tokens 3.0-4.2 ms a token with a schema against
17-20 ms with the grammar first in the chain (1.5-1.6 ms with none); at 32k, 0.9-1.8 ms against
4.0-6.3 ms (0.28-0.77 ms). A random model's choices are refused often; a model that writes JSON
when asked passes the check on most steps.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
from typing import Any

import numpy as np

from actors.types import GenerationParams
from actors.worker.backends import BadRequest

__all__ = [
    "MAX_TOP_LOGPROBS",
    "MIN_P",
    "PENALTY_LAST_N",
    "TOP_K",
    "Candidates",
    "grammar_of",
    "grammar_sampler",
    "request_samplers",
    "sample",
    "sampler_chain",
    "token_logprobs",
]

TOP_K = 40  # Llama.create_completion's sampler defaults that the wire does not carry
MIN_P = 0.05
PENALTY_LAST_N = 64
"""Generated tokens the penalties look back over: llama.cpp's and llama-cpp-python's default
(repeat_last_n). OpenAI counts the whole output; past 64 tokens a repeat is no longer seen."""
MAX_TOP_LOGPROBS = 20
"""Most alternatives a token's log probabilities list (OpenAI's top_logprobs limit)."""
SCHEMA_FIELD = "response_format.json_schema"
"""The request field a bad schema is blamed on (OpenAI's name for it)."""


def request_samplers(lib: Any, vocab: Any, params: GenerationParams, seed: int) -> tuple[Any, Any]:
    """Return a request's chain and its grammar sampler (None without a schema); the caller
    frees both with `llama_sampler_free`. On a refusal (BadRequest) nothing stays allocated."""
    grammar = grammar_sampler(lib, vocab, params)
    try:
        return sampler_chain(lib, vocab, params, seed), grammar
    except BaseException:
        if grammar is not None:
            lib.llama_sampler_free(grammar)
        raise


def grammar_sampler(lib: Any, vocab: Any, params: GenerationParams) -> Any:
    """Return the grammar sampler of `params.json_schema`, or None; BadRequest names
    `response_format.json_schema` when the schema cannot become a grammar llama.cpp takes."""
    grammar = grammar_of(params)
    if grammar is None:
        return None
    sampler = lib.llama_sampler_init_grammar(vocab, grammar, b"root")
    if not sampler:
        raise BadRequest(SCHEMA_FIELD, "llama.cpp could not compile the schema's grammar")
    return sampler


def sampler_chain(lib: Any, vocab: Any, params: GenerationParams, seed: int) -> Any:
    """Return a new chain for `params` (the caller frees it with `llama_sampler_free`).

    The logit bias and the penalties first; then greedy at temperature 0, else
    `Llama.generate`'s chain: top-k, top-p, min-p, temperature, then a draw seeded with
    `params.seed`, or `seed` when the request names none. Below 0 it draws from the raw logits.
    Raise BadRequest naming `logit_bias` when a bias names a token outside the vocabulary.
    """
    n_vocab = lib.llama_vocab_n_tokens(vocab)
    bias = _logit_bias(lib, params.logit_bias, n_vocab)  # checked before anything is allocated
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())

    def add(sampler: Any) -> None:
        lib.llama_sampler_chain_add(chain, sampler)  # the chain owns it from here

    if bias is not None:
        add(lib.llama_sampler_init_logit_bias(n_vocab, len(bias), bias))
    if (params.repeat_penalty, params.frequency_penalty, params.presence_penalty) != (1, 0, 0):
        add(
            lib.llama_sampler_init_penalties(
                n_vocab,
                PENALTY_LAST_N,
                params.repeat_penalty,
                params.frequency_penalty,
                params.presence_penalty,
            )
        )
    draw_seed = (seed if params.seed is None else params.seed) & 0xFFFFFFFF
    if params.temperature == 0.0:
        add(lib.llama_sampler_init_greedy())
        return chain
    if params.temperature > 0.0:
        add(lib.llama_sampler_init_top_k(TOP_K))
        add(lib.llama_sampler_init_top_p(params.top_p, 1))
        add(lib.llama_sampler_init_min_p(MIN_P, 1))
        add(lib.llama_sampler_init_temp(params.temperature))
    add(lib.llama_sampler_init_dist(draw_seed))
    return chain


def _logit_bias(lib: Any, pairs: tuple[tuple[int, float], ...], n_vocab: int) -> Any:
    """Return the llama_logit_bias array for `pairs`, or None when there are none."""
    if not pairs:
        return None
    for token, _ in pairs:
        if not 0 <= token < n_vocab:
            raise BadRequest(
                "logit_bias", f"token {token} is outside the vocabulary of {n_vocab} tokens"
            )
    array = (lib.llama_logit_bias * len(pairs))()
    for i, (token, value) in enumerate(pairs):
        array[i].token = token
        array[i].bias = value
    return array


def grammar_of(params: GenerationParams) -> bytes | None:
    """Return the GBNF grammar (root rule `root`) that `params.json_schema` asks for, or None.

    Raise BadRequest naming `response_format.json_schema` when the schema cannot be converted.
    """
    if params.json_schema is None:
        return None
    return _schema_grammar(params.json_schema)


@functools.lru_cache(maxsize=64)
def _schema_grammar(schema: str) -> bytes:
    # A client repeats its schema request after request: convert it once (a few ms in Python).
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        gbnf: str = json_schema_to_gbnf(schema)
    except json.JSONDecodeError as exc:
        raise BadRequest(SCHEMA_FIELD, f"is not JSON: {exc}") from None
    except Exception as exc:  # the converter raises bare Exceptions, KeyErrors, ValueErrors
        raise BadRequest(SCHEMA_FIELD, f"cannot be turned into a grammar: {exc}") from None
    return gbnf.encode("utf-8")


def token_logprobs(
    logits: np.ndarray[Any, Any], token: int, top_n: int
) -> tuple[float, list[tuple[int, float]]]:
    """Return `token`'s log probability under the model's raw `logits` (one row, n_vocab), and
    the `top_n` likeliest tokens with theirs, likeliest first.

    The model's distribution, before any sampler: what OpenAI reports (a grammar, a bias or a
    penalty changes what is drawn, not these figures).
    """
    row = logits.astype(np.float64, copy=False)
    peak = float(row.max())
    log_total = peak + float(np.log(np.exp(row - peak).sum()))
    top: list[tuple[int, float]] = []
    if top_n > 0:
        n = min(top_n, row.shape[0])
        best = np.argpartition(row, -n)[-n:]
        best = best[np.argsort(-row[best], kind="stable")]
        top = [(int(t), float(row[t]) - log_total) for t in best]
    return float(row[token]) - log_total, top


class Candidates:
    """One llama_token_data array over the whole vocabulary, reused: samplers run on it when
    the logits are not a decode's own (a cached prompt's saved row) or a grammar is checked
    apart. One thread uses it; samplers reorder and resize it, so each use refills it."""

    def __init__(self, lib: Any, n_vocab: int) -> None:
        self._lib = lib
        self._n_vocab = n_vocab
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._data = np.zeros(
            n_vocab, dtype=[("id", np.int32), ("logit", np.float32), ("p", np.float32)]
        )
        self._at = self._data.ctypes.data_as(lib.llama_token_data_p)
        self._array = lib.llama_token_data_array()
        self._one = (lib.llama_token_data * 1)()
        self._one_array = lib.llama_token_data_array()

    def draw(self, logits: np.ndarray[Any, Any], *samplers: Any) -> int:
        """Apply `samplers` in order to all of `logits`; return the token selected (none is
        accepted: the caller accepts the one it keeps)."""
        data, array = self._data, self._array
        data["id"] = self._ids
        data["logit"] = logits
        data["p"] = 0.0
        array.data = self._at
        array.size = self._n_vocab
        array.selected = -1
        array.sorted = False
        for sampler in samplers:
            self._lib.llama_sampler_apply(sampler, ctypes.byref(array))
        if not 0 <= array.selected < array.size:  # pragma: no cover - llama.cpp asserts it
            raise RuntimeError(f"the sampler selected candidate {array.selected}")
        return int(array.data[array.selected].id)

    def allows(self, grammar: Any, token: int) -> bool:
        """Return whether `grammar`, in its state now, lets `token` come next."""
        one, array = self._one, self._one_array
        one[0].id, one[0].logit, one[0].p = token, 1.0, 0.0
        array.data = ctypes.cast(one, self._lib.llama_token_data_p)
        array.size = 1
        array.selected = -1
        array.sorted = False
        self._lib.llama_sampler_apply(grammar, ctypes.byref(array))
        return bool(math.isfinite(array.data[0].logit))


def sample(
    lib: Any, chain: Any, grammar: Any, candidates: Candidates, logits: np.ndarray[Any, Any]
) -> int:
    """Draw the next token from `logits` and accept it into `chain` (and `grammar`).

    With a grammar, as llama.cpp's common sampler: draw with the chain alone, and only if the
    grammar refuses that token apply the grammar to every candidate, then the chain, again.
    Greedy draws what the grammar first in the chain would; a seeded draw, nearly so.
    """
    token = candidates.draw(logits, chain)
    if grammar is not None and not candidates.allows(grammar, token):
        token = candidates.draw(logits, grammar, chain)
    lib.llama_sampler_accept(chain, token)
    if grammar is not None:
        lib.llama_sampler_accept(grammar, token)
    return token
