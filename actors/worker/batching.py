"""Drive the continuous-batching GGUF engine from the worker's loop (every GGUF model).

The worker submits every request the moment it arrives and calls `step()` once per turn, so
all of them decode together, up to the engine's slots (actors/worker/backends/gguf_engine.py);
with one slot they run one after another. This module turns the wire's messages into engine
calls and the engine's callbacks into answers:

- Infer: submitted at once; its text streams as Token frames when it asked to stream, and its
  end comes back as Done (with the worker's memory now) or Failed (a failed decode: internal;
  a prompt that does not fit or a bad parameter: invalid_request naming the field).
- Cancel: cancels that one request, queued or running; the others go on untouched.
- A data link that closes: every request that came on it is cancelled (its answers are dropped).

Chat messages are rendered by the engine: the model's template, or ChatML for a model without
one, with the template's stops.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from actors.worker.backends import BadRequest, Generation, check_generation, generation_of
from actors.worker.backends.embedder import Embedder
from actors.worker.backends.gguf_engine import Finish, GgufEngine, Request
from actors.worker.links import DataLink
from actors.worker.protocol import Done, Embed, Embedded, Failed, Infer, Token

_Key = tuple[DataLink, int]  # a request is named by its link and its id on that link


class EngineDriver:
    """The requests in flight on one engine, by link and id, and how each is answered."""

    def __init__(self, engine: GgufEngine, memory_mb: Callable[[], float]) -> None:
        self.engine = engine
        self.memory_mb = memory_mb
        self.requests: dict[_Key, Request] = {}
        self.embedder: Embedder | None = None  # made on the first Embed

    def embed(self, link: DataLink, msg: Embed) -> None:
        """Answer an Embed at once, between two steps: its vectors, or Failed naming the input."""
        try:
            if self.embedder is None:
                self.embedder = self.engine.embedder()
            embedder = self.embedder
            tokens = [embedder.tokenize(x) if isinstance(x, str) else list(x) for x in msg.inputs]
            vectors = embedder.embed(tokens)
        except BadRequest as exc:
            link.send(Failed(msg.request_id, "invalid_request", exc.field, exc.message))
            return
        except Exception as exc:  # a library error fails this request, not the worker
            link.send(Failed(msg.request_id, "internal", "", f"{type(exc).__name__}: {exc}"))
            return
        used = sum(len(t) for t in tokens)
        link.send(Embedded(msg.request_id, tuple(vectors), used, self.memory_mb()))

    def close(self) -> None:
        """Free the embeddings context, then the engine (which frees the model they share)."""
        if self.embedder is not None:
            self.embedder.close()
            self.embedder = None
        self.engine.close()

    def has_work(self) -> bool:
        """Return True while a request is queued or running in the engine."""
        return self.engine.has_work()

    def submit(self, link: DataLink, msg: Infer) -> None:
        """Hand one request to the engine, or answer it Failed at once when it is invalid."""
        rid = msg.request_id
        key = (link, rid)
        ended = False

        def done(finish: Finish) -> None:
            nonlocal ended
            ended = True
            self.requests.pop(key, None)
            link.send(self._answer(rid, finish))

        emit: Callable[[str], None] = (
            (lambda text: link.send(Token(rid, text))) if msg.stream else _ignore
        )
        gen = generation_of(msg)
        try:
            check_generation(gen)
            prompt, stops, field = self._prompt(gen)
            request = self.engine.submit(
                prompt, gen.params, emit=emit, done=done, extra_stops=stops, field=field
            )
        except BadRequest as exc:
            link.send(Failed(rid, "invalid_request", exc.field, exc.message))
            return
        except Exception as exc:  # a bug or a library error: this request fails, not the worker
            link.send(Failed(rid, "internal", "", f"{type(exc).__name__}: {exc}"))
            return
        if not ended:  # nothing to generate ends it inside submit
            self.requests[key] = request

    def admit_cached(self) -> bool:
        """Start the queued requests whose prompt is cached, beside a running decode."""
        try:
            return self.engine.admit_cached()
        except Exception as exc:
            print(f"moc worker: a request's answer failed: {exc!r}", file=sys.stderr)
            return True  # some may have been answered before it: let them leave

    def cancel(self, link: DataLink, rid: int) -> None:
        """Cancel one request; its Done ("cancelled") goes out from the engine's callback."""
        request = self.requests.get((link, rid))
        if request is not None:
            self.engine.cancel(request)
        # Otherwise it already finished: its answer is on the way.

    def drop(self, link: DataLink) -> None:
        """Cancel every request that came on `link` (closed: their answers are dropped)."""
        for key in [key for key in self.requests if key[0] is link]:
            request = self.requests.get(key)
            if request is not None:  # a callback may have ended it meanwhile
                self.engine.cancel(request)

    def step(
        self,
        flush: Callable[[], None] | None = None,
        during: Callable[[int], None] | None = None,
    ) -> None:
        """Decode one batch (`flush`, `during`: see GgufEngine.step); a callback's error is
        logged, the other requests go on."""
        try:
            self.engine.step(flush, during)
        except Exception as exc:
            print(f"moc worker: a request's answer failed: {exc!r}", file=sys.stderr)

    def _answer(self, rid: int, finish: Finish) -> Done | Failed:
        if finish.error:
            return Failed(rid, "internal", "", finish.error)
        out = finish.outcome()
        return Done(
            rid,
            out.text,
            out.tokens_generated,
            out.prompt_tokens,
            out.finish_reason,
            None,
            self.memory_mb(),
            prompt_tokens_reused=finish.prompt_tokens_reused,
            first_token_ms=finish.first_token_ms,
            logprobs=finish.logprobs,
        )

    def _prompt(self, gen: Generation) -> tuple[str | Sequence[int], tuple[str, ...], str]:
        """Return what to submit: the prompt text or the chat's tokens, extra stops, field."""
        if gen.tensors is not None:
            raise BadRequest("tensors", "a GGUF model takes text, not tensors")
        if gen.messages is None:
            return gen.prompt or "", (), "prompt"
        tokens, stops = self.engine.chat_prompt(gen.messages)
        return tokens, stops, "messages"


def _ignore(_: str) -> None:
    """Drop a piece of text: the request did not ask to stream."""
