"""The GGUF backend: llama.cpp through llama-cpp-python, one sequence at a time.

Generation runs its own loop over `Llama.generate` (the same sampler chain and defaults as
`Llama.create_completion`) so that it can count tokens exactly, stream each token's text the
moment it is safe, honour stop sequences split across tokens, and stop between tokens when the
supervisor cancels. Greedy text is byte for byte what `create_completion` returns.

On the CPU the weights are read into memory (`use_mmap=False`): the worker's RSS then really
contains them, so the measured memory is honest, and a page cache eviction cannot stall decoding.
On a GPU mmap is kept: offloaded weights are copied to VRAM and the mapping is dropped.
"""

from __future__ import annotations

import codecs
import collections
import ctypes
from collections.abc import Callable
from pathlib import Path
from typing import Any

from actors.backends import (
    BackendError,
    BadRequest,
    Generation,
    LoadSpec,
    Outcome,
    file_version,
)
from actors.backends.sampler_cache import SamplerCache
from actors.backends.stops import StopMatcher
from actors.types import FinishReason

# Sampler defaults of Llama.create_completion that the wire does not carry.
_TOP_K = 40
_MIN_P = 0.05
_REPEAT_PENALTY = 1.0

_GGUF_MAGIC = b"GGUF"

_UTF8 = codecs.getincrementaldecoder("utf-8")
_CACHED_PROMPTS = 256  # prompts whose tokens are kept
_CACHED_PROMPT_CHARS = 4096  # longer prompts are tokenized each time (their decode dominates)


class _LlamaLog:
    """Keep llama.cpp's recent log lines so a load failure can say what llama.cpp saw.

    llama.cpp keeps the callback's address for the life of the process and calls it whenever it
    logs (a CUDA build logs while freeing a model, for one), so there is one per process and it
    is never freed: a hook dropped after a load left a dangling pointer that crashed the worker.
    """

    def __init__(self, llama_cpp: Any) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=40)
        self._partial = ""

        def on_log(level: int, text: bytes | None, _user: ctypes.c_void_p) -> None:
            self._partial += (text or b"").decode("utf-8", errors="replace")
            while "\n" in self._partial:
                line, self._partial = self._partial.split("\n", 1)
                if line.strip():
                    self.lines.append(line.strip())

        self._callback = llama_cpp.llama_log_callback(on_log)
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))

    def errors(self) -> str:
        """Return the last lines that look like errors, or the last few lines."""
        lines = list(self.lines)
        bad = [ln for ln in lines if "error" in ln.lower() or "failed" in ln.lower()]
        return "; ".join((bad or lines)[-4:])


_log: _LlamaLog | None = None


def _llama_log(llama_cpp: Any) -> _LlamaLog:
    """Return the process's llama.cpp log hook, installed on first use, its lines cleared."""
    global _log
    if _log is None:
        _log = _LlamaLog(llama_cpp)
    _log.lines.clear()
    return _log


def check_gguf_file(path: str) -> None:
    """Raise BackendError unless `path` is a readable file that starts with the GGUF magic."""
    p = Path(path)
    if not p.is_file():
        raise BackendError(f"model file {path} does not exist or is not a file")
    try:
        with p.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise BackendError(f"cannot read model file {path}: {exc.strerror}") from exc
    if magic != _GGUF_MAGIC:
        raise BackendError(f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF')")


class GgufModel:
    """A GGUF model loaded with llama-cpp-python."""

    def __init__(
        self, llm: Any, llama_cpp: Any, version: str, seed: int, *, reuse: bool = True
    ) -> None:
        self._llm = llm
        self._llama_cpp = llama_cpp
        self._version = version
        self._seed = seed
        self._chat: Any | None = None
        # Per-request work that gives the same answer every time, done once (`reuse` False
        # turns it off, for tests that compare both ways): sampler chains, the tokens of
        # recent prompts, the bytes of each token.
        self._reuse = reuse
        self.samplers = SamplerCache(llm).install() if reuse else None
        self._prompts: collections.OrderedDict[str, tuple[int, ...]] = collections.OrderedDict()
        self._pieces: dict[int, bytes] = {}

    @classmethod
    def load(cls, spec: LoadSpec, *, reuse: bool = True) -> GgufModel:
        """Load the model described by `spec`; raise BackendError with llama.cpp's reason."""
        check_gguf_file(spec.path)
        try:
            import llama_cpp
        except ImportError as exc:  # pragma: no cover - a dependency of the package
            raise BackendError(f"llama-cpp-python is not installed: {exc}") from exc
        log = _llama_log(llama_cpp)
        kwargs: dict[str, Any] = {
            "model_path": spec.path,
            "n_ctx": spec.n_ctx,
            "n_gpu_layers": spec.gpu_layers if spec.on_gpu else 0,
            "seed": spec.seed,
            "use_mmap": spec.on_gpu,
            "verbose": False,
        }
        if spec.n_threads > 0:
            kwargs["n_threads"] = spec.n_threads
            kwargs["n_threads_batch"] = spec.n_threads
        if spec.on_gpu and spec.device_index is not None:
            kwargs["main_gpu"] = spec.device_index
        if spec.lora_path:
            kwargs["lora_path"] = spec.lora_path
        try:
            llm = llama_cpp.Llama(**kwargs)
        except Exception as exc:
            detail = log.errors()
            raise BackendError(
                f"llama.cpp could not load {spec.path}: {exc}" + (f" ({detail})" if detail else "")
            ) from exc
        name = llm.metadata.get("general.name") or Path(spec.path).stem
        return cls(llm, llama_cpp, file_version(spec.path, name), spec.seed, reuse=reuse)

    @property
    def version(self) -> str:
        """Identify the weights."""
        return self._version

    @property
    def n_ctx(self) -> int:
        """Return the context length in tokens."""
        return int(self._llm.n_ctx())

    def close(self) -> None:
        """Free the model, its context and its sampler chains."""
        if self.samplers is not None:
            self.samplers.close()
        self._llm.close()

    def _chat_prompt(self, gen: Generation) -> tuple[list[int], tuple[str, ...]]:
        """Render the messages with the model's chat template as create_chat_completion does."""
        template = self._llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise BadRequest("messages", "this model has no chat template; send a prompt instead")
        if self._chat is None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            model = self._llm._model
            eos, bos = self._llm.token_eos(), self._llm.token_bos()
            self._chat = Jinja2ChatFormatter(
                template=template,
                eos_token=model.token_get_text(eos) if eos != -1 else "",
                bos_token=model.token_get_text(bos) if bos != -1 else "",
            )
        messages: list[Any] = [{"role": m.role, "content": m.content} for m in gen.messages or ()]
        try:
            rendered = self._chat(messages=messages)
        except Exception as exc:  # jinja2 errors and the template's raise_exception
            raise BadRequest("messages", f"chat template failed: {exc}") from exc
        tokens = self._llm.tokenize(
            rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True
        )
        extra = rendered.stop if isinstance(rendered.stop, list) else [rendered.stop]
        return tokens, tuple(s for s in extra if s)

    def _completion_prompt(self, prompt: str) -> list[int]:
        """Tokenize a prompt as create_completion does (BOS when the model wants it).

        Recent short prompts keep their tokens: agents repeat theirs, and tokenizing is a pure
        function of the text.
        """
        cached = self._prompts.get(prompt)
        if cached is not None:
            self._prompts.move_to_end(prompt)
            return list(cached)
        llm = self._llm
        bos = [llm.token_bos()] if llm._model.add_bos_token() and llm.token_bos() != -1 else []
        body = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True) if prompt else []
        tokens = bos + body
        if self._reuse and len(prompt) <= _CACHED_PROMPT_CHARS:
            self._prompts[prompt] = tuple(tokens)
            if len(self._prompts) > _CACHED_PROMPTS:
                self._prompts.popitem(last=False)
        return tokens

    def _piece(self, token: int) -> bytes:
        """Return a token's bytes (at most one entry per vocabulary token is kept)."""
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._llm.detokenize([token])
            if self._reuse:
                self._pieces[token] = piece
        return piece

    def run(
        self, gen: Generation, emit: Callable[[str], None], should_stop: Callable[[], bool]
    ) -> Outcome:
        """Generate for one prompt or conversation, streaming safe text through `emit`."""
        if gen.tensors is not None:
            raise BadRequest("tensors", "a GGUF model takes text, not tensors")
        if gen.messages is not None:
            tokens, extra_stops = self._chat_prompt(gen)
        else:
            tokens, extra_stops = self._completion_prompt(gen.prompt or ""), ()
        n_ctx = self.n_ctx
        if len(tokens) >= n_ctx:
            raise BadRequest(
                "input_text", f"prompt is {len(tokens)} tokens; the context holds {n_ctx}"
            )
        budget = min(gen.max_tokens, n_ctx - len(tokens))
        if not tokens:
            # An empty prompt on a model without BOS: llama.cpp needs one token to start from.
            tokens = [self._llm.token_bos()]
        return self._generate(tokens, budget, gen, gen.stop + extra_stops, emit, should_stop)

    def _generate(
        self,
        tokens: list[int],
        budget: int,
        gen: Generation,
        stops: tuple[str, ...],
        emit: Callable[[str], None],
        should_stop: Callable[[], bool],
    ) -> Outcome:
        llm, lib = self._llm, self._llama_cpp
        llm.set_seed(gen.seed if gen.seed is not None else self._seed)
        matcher = StopMatcher(stops)
        decoder = _UTF8(errors="ignore")
        vocab = llm._model.vocab
        out: list[str] = []
        produced = 0
        finish: FinishReason = "length"
        if budget <= 0 or should_stop():
            return self._outcome(out, 0, len(tokens), "cancelled" if budget > 0 else "length")
        stream = llm.generate(
            tokens,
            top_k=_TOP_K,
            top_p=gen.top_p,
            min_p=_MIN_P,
            temp=gen.temperature,
            repeat_penalty=_REPEAT_PENALTY,
        )
        try:
            for token in stream:
                if lib.llama_vocab_is_eog(vocab, token):
                    finish = "stop"
                    break
                produced += 1
                piece = decoder.decode(self._piece(token))
                safe = matcher.feed(piece) if piece else ""
                if safe:
                    out.append(safe)
                    emit(safe)
                if matcher.stopped:
                    finish = "stop"
                    break
                if produced >= budget:
                    break
                if should_stop():
                    finish = "cancelled"
                    break
        finally:
            stream.close()
        if not matcher.stopped and finish != "cancelled":
            tail = matcher.feed(decoder.decode(b"", final=True)) + matcher.flush()
            if tail:
                out.append(tail)
                emit(tail)
        return self._outcome(out, produced, len(tokens), finish)

    @staticmethod
    def _outcome(out: list[str], produced: int, n_prompt: int, finish: FinishReason) -> Outcome:
        return Outcome("".join(out), produced, n_prompt, finish)
