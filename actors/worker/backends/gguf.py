"""The GGUF backend: llama.cpp through llama-cpp-python, one sequence at a time.

Generation runs its own loop over `Llama.generate` (the same sampler chain and defaults as
`Llama.create_completion`) so that it can count tokens exactly, stream each token's text the
moment it is safe, honour stop sequences split across tokens, and stop between tokens when the
supervisor cancels. Greedy text is byte for byte what `create_completion` returns.

On the CPU the weights are read into memory (`use_mmap=False`): the worker's RSS then really
contains them, so the measured memory is honest, and a page cache eviction cannot stall decoding.
On a GPU mmap is kept: offloaded weights are copied to VRAM and the mapping is dropped.

CPU-resident weights stay in the layout the file has unless `LoadSpec.cpu_repack` is set:
llama.cpp's repacked "extra buffer types" include the AMX one, whose matmul crashes on the Xeons
of most GPU servers (see `[models] cpu_repack`). The load log line says where the weights went.
"""

from __future__ import annotations

import codecs
import collections
import ctypes
import functools
import os
import re
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.types import ChatMessage, FinishReason, GenerationParams
from actors.worker.backends import BackendError, BadRequest, Generation, Outcome, file_version
from actors.worker.backends.sampler_cache import SamplerCache
from actors.worker.backends.stops import StopMatcher
from actors.worker.protocol import LoadSpec

# Sampler defaults of Llama.create_completion that the wire does not carry.
_TOP_K = 40
_MIN_P = 0.05
_REPEAT_PENALTY = 1.0

_GGUF_MAGIC = b"GGUF"

_UTF8 = codecs.getincrementaldecoder("utf-8")
_CACHED_PROMPTS = 256  # prompts whose tokens are kept
_CACHED_PROMPT_CHARS = 4096  # longer prompts are tokenized each time (their decode dominates)

# llama.cpp's load log names each buffer that holds weights: "load_tensors: CPU_REPACK model
# buffer size = 1.27 MiB" (CPU, CPU_REPACK, AMX, CUDA0, CUDA_Host, ...).
_WEIGHT_BUFFER = re.compile(r"load_tensors:\s+(\S+) model buffer size =\s+([0-9.]+) MiB")


class _LlamaLog:
    """Keep llama.cpp's recent log lines so a load failure can say what llama.cpp saw.

    llama.cpp keeps the callback's address for the life of the process and calls it whenever it
    logs (a CUDA build logs while freeing a model, for one), so there is one per process and it
    is never freed: a hook dropped after a load left a dangling pointer that crashed the worker.
    """

    def __init__(self, llama_cpp: Any) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=40)
        self.weights: dict[str, float] = {}  # MiB of weights per buffer type, from the last load
        self._partial = ""

        def on_log(level: int, text: bytes | None, _user: ctypes.c_void_p) -> None:
            self._partial += (text or b"").decode("utf-8", errors="replace")
            while "\n" in self._partial:
                line, self._partial = self._partial.split("\n", 1)
                if line.strip():
                    self.lines.append(line.strip())
                    buffer = _WEIGHT_BUFFER.search(line)
                    if buffer is not None:
                        self.weights[buffer[1]] = float(buffer[2])

        self._callback = llama_cpp.llama_log_callback(on_log)
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))

    def errors(self) -> str:
        """Return the last lines that look like errors, or the last few lines."""
        lines = list(self.lines)
        bad = [ln for ln in lines if "error" in ln.lower() or "failed" in ln.lower()]
        return "; ".join((bad or lines)[-4:])


_log: _LlamaLog | None = None


def llama_log(llama_cpp: Any) -> _LlamaLog:
    """Return the process's llama.cpp log hook, installed on first use, its lines cleared."""
    global _log
    if _log is None:
        _log = _LlamaLog(llama_cpp)
    _log.lines.clear()
    _log.weights.clear()
    return _log


_params_lock = threading.Lock()


def open_llama(llama_cpp: Any, kwargs: dict[str, Any], *, cpu_repack: bool) -> Any:
    """Return `llama_cpp.Llama(**kwargs)` loaded with llama.cpp's CPU weight repacking on or off.

    Off is llama_model_params.use_extra_bufts = false (llama.cpp's `--no-repack`): the weights
    stay in the file's layout, so neither the CPU_REPACK nor the AMX buffer type, whose matmul
    crashes on AMX Xeons, is used. `Llama()` takes no such argument (it ignores unknown
    keywords) and hands the struct it gets from `llama_model_default_params()` straight to
    llama.cpp, so that call is the one hook: it is wrapped while `Llama()` runs and restored
    after, under a lock so that two loads through here cannot see each other's setting (a
    worker makes one load; a `Llama()` made elsewhere in the process meanwhile would see it).
    The struct the model kept is checked afterwards, in case a later llama-cpp-python stops
    calling it. Raise BackendError when repacking cannot be turned off.
    """
    has_switch = any(f[0] == "use_extra_bufts" for f in llama_cpp.llama_model_params._fields_)
    if not has_switch:
        if cpu_repack:
            return llama_cpp.Llama(**kwargs)
        raise BackendError(
            f"llama-cpp-python {llama_cpp.__version__} cannot turn off llama.cpp's CPU weight "
            "repacking (llama_model_params has no use_extra_bufts), which crashes on CPUs "
            "with AMX: upgrade llama-cpp-python, or set cpu_repack = true to load anyway"
        )
    lib = llama_cpp.llama_cpp  # the module llama.py calls through
    with _params_lock:
        defaults = lib.llama_model_default_params

        def with_switch() -> Any:
            params = defaults()
            params.use_extra_bufts = cpu_repack
            return params

        lib.llama_model_default_params = with_switch
        try:
            llm = llama_cpp.Llama(**kwargs)
        finally:
            lib.llama_model_default_params = defaults
    if bool(llm.model_params.use_extra_bufts) != cpu_repack:
        llm.close()
        raise BackendError(
            f"llama-cpp-python {llama_cpp.__version__} did not pass use_extra_bufts = "
            f"{str(cpu_repack).lower()} to llama.cpp (Llama() no longer calls "
            "llama_model_default_params); refusing to load with CPU repacking in an unknown state"
        )
    return llm


def prepare_crash_reports() -> int | None:
    """Make a native crash in llama.cpp leave its stack in this process's log; see below.

    Return the address of ggml's `ggml_print_backtrace(void)` (None if this build lacks it): it
    prints the calling thread's native stack to fds 1/2 (through gdb when gdb can attach, else
    glibc's backtrace_symbols_fd), which makes it fit to run as a fatal-signal handler.

    Also, with verbose=False llama-cpp-python points fds 1 and 2 at its own /dev/null files
    while it loads a model, so a crash there would print that stack (and an abort its message)
    to nowhere. Those two files are made copies of our stdout and stderr, which makes the
    redirection change nothing. It is for a process that loads models and nothing else (a
    worker): llama.cpp's ordinary log goes to `_LlamaLog` either way, so only what llama.cpp
    writes straight to the fds, aborts and crashes, now shows. A llama-cpp-python without the
    files is left alone.
    """
    try:
        import llama_cpp
    except ImportError:  # the load reports it, with its own message
        return None
    utils = getattr(llama_cpp, "_utils", None)
    for name, fd in (("outnull_file", 1), ("errnull_file", 2)):
        null = getattr(utils, name, None)
        if null is not None:
            os.dup2(fd, null.fileno())
    lib = getattr(llama_cpp.llama_cpp, "_lib", None)  # libllama, which links libggml-base
    try:
        func = lib.ggml_print_backtrace if lib is not None else None
    except AttributeError:
        return None
    return None if func is None else ctypes.cast(func, ctypes.c_void_p).value


def describe_buffers(weights: dict[str, float]) -> str:
    """Say where the weights went: "CPU_REPACK 1.27 MiB, CPU 0.08 MiB", biggest first."""
    if not weights:
        return "(llama.cpp did not say)"
    ranked = sorted(weights.items(), key=lambda item: -item[1])
    return ", ".join(f"{name} {mib:.2f} MiB" for name, mib in ranked)


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


@dataclass(frozen=True, slots=True)
class ChatPrompt:
    """Messages rendered with a chat template: the text to tokenize and the template's stops."""

    text: str
    add_bos: bool  # False when the template already wrote the BOS text
    stops: tuple[str, ...]


@functools.lru_cache(maxsize=8)
def _chat_formatter(template: str, bos_text: str, eos_text: str) -> Any:
    """Compile a chat template once per model (a worker serves one, the tests a few)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    return Jinja2ChatFormatter(template=template, eos_token=eos_text, bos_token=bos_text)


def render_chat(
    template: str, *, bos_text: str, eos_text: str, messages: Sequence[ChatMessage]
) -> ChatPrompt:
    """Render `messages` with `template` as create_chat_completion does (both GGUF backends).

    Raise BadRequest on "messages" when the template fails (a jinja2 error or its own
    raise_exception, e.g. roles that do not alternate).
    """
    formatter = _chat_formatter(template, bos_text, eos_text)
    given: list[Any] = [{"role": m.role, "content": m.content} for m in messages]
    try:
        rendered = formatter(messages=given)
    except Exception as exc:  # jinja2 errors and the template's raise_exception
        raise BadRequest("messages", f"chat template failed: {exc}") from exc
    extra = rendered.stop if isinstance(rendered.stop, list) else [rendered.stop]
    return ChatPrompt(rendered.prompt, not rendered.added_special, tuple(s for s in extra if s))


class GgufModel:
    """A GGUF model loaded with llama-cpp-python."""

    def __init__(
        self, llm: Any, llama_cpp: Any, version: str, seed: int, *, reuse: bool = True
    ) -> None:
        self._llm = llm
        self._llama_cpp = llama_cpp
        self._version = version
        self._seed = seed
        # Per-request work that gives the same answer every time, done once (`reuse` False
        # turns it off, for tests that compare both ways): sampler chains, the tokens of
        # recent prompts, the bytes of each token.
        self._reuse = reuse
        self.samplers = SamplerCache(llm).install() if reuse else None
        self._prompts: collections.OrderedDict[str, tuple[int, ...]] = collections.OrderedDict()
        self._pieces: dict[int, bytes] = {}
        # MiB of weights per llama.cpp buffer type ("CPU", "CPU_REPACK", "AMX", "CUDA0", ...).
        self.weight_buffers: dict[str, float] = {}

    @classmethod
    def load(cls, spec: LoadSpec, *, reuse: bool = True) -> GgufModel:
        """Load the model described by `spec`; raise BackendError with llama.cpp's reason."""
        check_gguf_file(spec.path)
        try:
            import llama_cpp
        except ImportError as exc:  # pragma: no cover - a dependency of the package
            raise BackendError(f"llama-cpp-python is not installed: {exc}") from exc
        log = llama_log(llama_cpp)
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
            llm = open_llama(llama_cpp, kwargs, cpu_repack=spec.cpu_repack)
        except BackendError:
            raise
        except Exception as exc:
            detail = log.errors()
            raise BackendError(
                f"llama.cpp could not load {spec.path}: {exc}" + (f" ({detail})" if detail else "")
            ) from exc
        name = llm.metadata.get("general.name") or Path(spec.path).stem
        version = file_version(spec.path, name)
        if spec.lora_path:  # the adapter is part of what is served: a new one is a new version
            version += "+" + file_version(spec.lora_path, Path(spec.lora_path).stem)
        model = cls(llm, llama_cpp, version, spec.seed, reuse=reuse)
        model.weight_buffers = dict(log.weights)
        print(
            f"moc gguf: loaded {spec.path}: weights in {describe_buffers(model.weight_buffers)}"
            f" (cpu_repack {'on' if spec.cpu_repack else 'off'})",
            file=sys.stderr,
            flush=True,
        )
        return model

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
        model = self._llm._model
        eos, bos = self._llm.token_eos(), self._llm.token_bos()
        chat = render_chat(
            template,
            bos_text=model.token_get_text(bos) if bos != -1 else "",
            eos_text=model.token_get_text(eos) if eos != -1 else "",
            messages=gen.messages or (),
        )
        tokens = self._llm.tokenize(chat.text.encode("utf-8"), add_bos=chat.add_bos, special=True)
        return tokens, chat.stops

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
            field = "messages" if gen.messages is not None else "prompt"
            raise BadRequest(field, f"prompt is {len(tokens)} tokens; the context holds {n_ctx}")
        params = gen.params
        budget = min(params.max_tokens, n_ctx - len(tokens))
        if not tokens:
            # An empty prompt on a model without BOS: llama.cpp needs one token to start from.
            tokens = [self._llm.token_bos()]
        return self._generate(tokens, budget, params, params.stop + extra_stops, emit, should_stop)

    def _generate(
        self,
        tokens: list[int],
        budget: int,
        params: GenerationParams,
        stops: tuple[str, ...],
        emit: Callable[[str], None],
        should_stop: Callable[[], bool],
    ) -> Outcome:
        llm, lib = self._llm, self._llama_cpp
        llm.set_seed(params.seed if params.seed is not None else self._seed)
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
            top_p=params.top_p,
            min_p=_MIN_P,
            temp=params.temperature,
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
