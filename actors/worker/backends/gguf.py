"""What the GGUF serving engine (gguf_engine.py) and other llama.cpp users share.

The engine is the one path that serves GGUF models; this module holds what it shares with the
rest of the node: the file check, llama.cpp's log hook, the crash-report preparation, chat
template rendering (the model's own, or ChatML for a model without one) and `open_llama`, which
loads a `llama_cpp.Llama` with the worker's CPU repacking setting (goal scoring and the tests
that compare the engine with llama-cpp-python).

On the CPU the weights are read into memory (no mmap): the worker's RSS then really contains
them, so the measured memory is honest, and a page cache eviction cannot stall decoding. On a
GPU mmap is kept: offloaded weights are copied to VRAM and the mapping is dropped.

CPU-resident weights stay in the layout the file has unless `LoadSpec.cpu_repack` is set:
llama.cpp's repacked "extra buffer types" include the AMX one, whose matmul crashes on the Xeons
of most GPU servers (see `[models] cpu_repack`). The load log line says where the weights went.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from actors.types import ChatMessage
from actors.worker.backends import BackendError, BadRequest

_GGUF_MAGIC = b"GGUF"

# llama.cpp server's fallback for a model without `tokenizer.chat_template` (its "chatml").
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_STOP = "<|im_end|>"

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
    """Render `messages` with `template` as create_chat_completion does.

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
