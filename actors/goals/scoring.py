"""Score a model on evaluation records through llama.cpp: mean token loss and perplexity.

Runs in a helper process (`python -m actors.goals.scoring REQUEST RESULT`), as every llama.cpp
model of the node does, so a crash in native code fails one evaluation, not the node, and a
cancelled evaluation is stopped by killing the process. The model is loaded with
`logits_all=True` so one forward pass yields the logits at every position; the loss is the mean
negative log-likelihood (natural log) of each scored token given the tokens before it, and the
perplexity is exp(loss). A LoRA adapter (a GGUF with `general.type = "adapter"`) is evaluated
on top of the base model.

Texts longer than `n_ctx` are scored in windows of n_ctx tokens that overlap by one token, so
every token but the first of a text is scored exactly once, with at most n_ctx - 1 tokens of
context. Scoring stops after `max_tokens` tokens, the same tokens for both models when they
share a vocabulary.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from actors.goals.evalset import EvalRecord


def gguf_type(path: str | Path) -> str:
    """Return a GGUF's `general.type` ("model" when absent, "adapter" for a LoRA)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get("general.type")
    if field is None:
        return "model"
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Return -log softmax(logits)[target] per row, in float64."""
    rows = logits.astype(np.float64)
    peak = rows.max(axis=1, keepdims=True)
    lse = peak[:, 0] + np.log(np.exp(rows - peak).sum(axis=1))
    result: np.ndarray = lse - rows[np.arange(len(targets)), targets]
    return result


def score_model(
    model_path: str,
    records: Sequence[EvalRecord],
    *,
    lora_path: str | None = None,
    n_ctx: int = 512,
    max_tokens: int = 8192,
    n_threads: int = 0,
) -> dict[str, Any]:
    """Return {"loss", "perplexity", "tokens"} of one model on `records`."""
    import llama_cpp

    from actors.worker.backends.gguf import open_llama

    kwargs: dict[str, Any] = {
        "model_path": model_path,
        "n_ctx": n_ctx,
        "n_batch": n_ctx,
        "logits_all": True,
        "n_gpu_layers": 0,
        "verbose": False,
    }
    if lora_path:
        kwargs["lora_path"] = lora_path
    if n_threads:
        kwargs["n_threads"] = kwargs["n_threads_batch"] = n_threads
    # Repacking off, as the GGUF backend loads: it crashes q8_0/q4_0 decoding on AMX Xeons.
    llm = open_llama(llama_cpp, kwargs, cpu_repack=False)
    # llama.cpp may pad its context past n_ctx, but the Python buffers hold n_ctx positions.
    window_len = min(n_ctx, int(llm.n_ctx()))
    total = 0.0
    count = 0
    try:
        for record in records:
            if count >= max_tokens:
                break
            first = len(llm.tokenize(record.prompt.encode("utf-8"), add_bos=True))
            tokens = llm.tokenize((record.prompt + record.completion).encode("utf-8"), add_bos=True)
            first = max(1, first)  # the first token has no context to be predicted from
            start = 0
            while start + 1 < len(tokens) and count < max_tokens:
                window = tokens[start : start + window_len]
                # Targets are window[1:]; keep those at or past `first`, up to the budget.
                lo = max(1, first - start)
                hi = min(len(window), lo + (max_tokens - count))
                if lo < hi:
                    llm.reset()
                    llm.eval(window[:hi])
                    logits = np.asarray(llm.scores[lo - 1 : hi - 1])
                    targets = np.asarray(window[lo:hi])
                    total += float(_nll(logits, targets).sum())
                    count += hi - lo
                start += window_len - 1
    finally:
        llm.close()
    if count == 0:
        raise ValueError("the evaluation set yields no tokens to score")
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}


def evaluate(request: dict[str, Any]) -> dict[str, Any]:
    """Score the base and the candidate of one evaluate request (see `main`)."""
    records = [EvalRecord(r["prompt"], r["completion"]) for r in request["records"]]
    base = request["base_path"]
    candidate = request["candidate_path"]
    adapter = gguf_type(candidate) == "adapter"

    def score(path: str, lora: str | None) -> dict[str, Any]:
        return score_model(
            path,
            records,
            lora_path=lora,
            n_ctx=int(request["n_ctx"]),
            max_tokens=int(request["max_tokens"]),
            n_threads=int(request.get("n_threads", 0)),
        )

    return {
        "base": score(base, None),
        "candidate": score(base, candidate) if adapter else score(candidate, None),
        "candidate_is_adapter": adapter,
    }


def main(argv: list[str] | None = None) -> int:
    """Read a JSON request from argv[0], write {"ok": ..., ...} as JSON to argv[1]."""
    request_path, result_path = (argv if argv is not None else sys.argv[1:])[:2]
    try:
        request = json.loads(Path(request_path).read_text())
        answer: dict[str, Any] = {"ok": True, **evaluate(request)}
    except Exception as exc:  # reported to the parent, which fails the step with it
        answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    Path(result_path).write_text(json.dumps(answer))
    return 0 if answer["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
