"""How a GGUF request samples: the llama.cpp sampler chain built from its parameters.

Pure construction over llama.cpp's low-level API (`lib` is `llama_cpp.llama_cpp`): the engine
builds one chain per admitted request and frees it when the request ends. The chain's order is
llama.cpp's common sampler's: the grammar (a `json_schema` turned into GBNF) first, so every
later sampler sees only tokens that keep the output valid; then the logit bias and the
penalties; then top-k, top-p, min-p, temperature and the draw (or greedy).
"""

from __future__ import annotations

import functools
import json
from typing import Any

import numpy as np

from actors.types import GenerationParams
from actors.worker.backends import BadRequest

__all__ = [
    "MAX_TOP_LOGPROBS",
    "MIN_P",
    "PENALTY_LAST_N",
    "TOP_K",
    "grammar_of",
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


def sampler_chain(lib: Any, vocab: Any, params: GenerationParams, seed: int) -> Any:
    """Return a new chain for `params` (the caller frees it with `llama_sampler_free`).

    Greedy at temperature 0; else `Llama.generate`'s chain: top-k, top-p, min-p, temperature,
    then a draw seeded with `params.seed`, or `seed` when the request names none. Below 0 it
    draws from the raw logits. Raise BadRequest naming the field when a logit bias names a token
    outside the vocabulary or llama.cpp refuses the grammar.
    """
    n_vocab = lib.llama_vocab_n_tokens(vocab)
    bias = _logit_bias(lib, params.logit_bias, n_vocab)  # checked before anything is allocated
    grammar = grammar_of(params)
    grammar_sampler = None
    if grammar is not None:
        grammar_sampler = lib.llama_sampler_init_grammar(vocab, grammar, b"root")
        if not grammar_sampler:
            raise BadRequest(SCHEMA_FIELD, "llama.cpp could not compile the schema's grammar")
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())

    def add(sampler: Any) -> None:
        lib.llama_sampler_chain_add(chain, sampler)  # the chain owns it from here

    if grammar_sampler is not None:
        add(grammar_sampler)
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
