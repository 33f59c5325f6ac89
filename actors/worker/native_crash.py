"""Native crash reports for worker processes: the worker prints its native stack, the supervisor
reads it back and names the function that crashed, with the CPU it crashed on.

Worker side: `install_native_handler(printer)` makes a C function that prints the native stack
(ggml's `ggml_print_backtrace`) the handler of the fatal signals, and is called before
`faulthandler.enable`: faulthandler keeps the handler it found, writes the Python stack, puts
that handler back and raises the signal again, so the log holds the Python stack, then the
native one, and the process still dies of its signal. Nothing in Python runs inside the handler.

Supervisor side: `describe_crash(log)` finds the last native backtrace in a worker's log (gdb's
`#3  0x... in f (...) from lib.so` or glibc's `lib.so(f+0x1a)[0x...]` lines), skips the signal
machinery and says e.g. "llama.cpp crashed in ggml_backend_amx_mul_mat <-
ggml::cpu::amx::tensor_traits::compute_forward (cpu: Intel(R) Xeon(R) ...; avx2 avx512f
amx_int8 ...)". The SIMD flags decide which kernels llama.cpp chose, so they belong with it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path

FATAL_SIGNALS = (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT)

# <signal.h> on Linux: reset to SIG_DFL on entry (the re-raised signal then ends the process),
# run on faulthandler's alternate stack (a stack overflow leaves no room on the thread's own),
# and take a signal raised from inside another handler at once.
_SA_RESETHAND = 0x80000000
_SA_ONSTACK = 0x08000000
_SA_NODEFER = 0x40000000


class _Sigaction(ctypes.Structure):
    """glibc's `struct sigaction` on Linux (x86-64 and aarch64 share the layout)."""

    _fields_ = [
        ("handler", ctypes.c_void_p),
        ("mask", ctypes.c_ulong * (128 // ctypes.sizeof(ctypes.c_ulong))),
        ("flags", ctypes.c_int),
        ("restorer", ctypes.c_void_p),
    ]


def install_native_handler(printer: int) -> None:
    """Make the C function at `printer` (`void f(void)`) the handler of every fatal signal.

    Call it before `faulthandler.enable()` (disable and enable again if it already is), so that
    faulthandler chains to it. A `void(void)` function is safe to call as `void(int)` on the
    Linux ABIs, where the caller cleans up its arguments.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    action = _Sigaction()
    action.handler = printer
    action.flags = _SA_RESETHAND | _SA_ONSTACK | _SA_NODEFER
    for sig in FATAL_SIGNALS:
        if libc.sigaction(int(sig), ctypes.byref(action), None) != 0:
            raise OSError(ctypes.get_errno(), f"sigaction({sig.name}) failed")


@dataclass(frozen=True, slots=True)
class Frame:
    """One line of a native backtrace: the function (None when unnamed) and its library."""

    function: str | None
    library: str | None  # the shared object's file name, when the line gives it
    offset: str = ""  # "+0x3c050" into `library`, kept for unnamed frames
    signal_frame: bool = False  # gdb's "<signal handler called>"


# glibc backtrace_symbols_fd: "/path/libllama.so(llama_decode+0x1a)[0x7f..]" or "(+0x3c050)".
_GLIBC_FRAME = re.compile(
    r"^(?P<obj>[^\s(]+)\((?P<sym>[^()+]*)(?P<off>\+0x[0-9a-fA-F]+)?\)\s*\[0x[0-9a-fA-F]+\]\s*$"
)
# gdb: "#7  0x00007f.. in llama_model_n_embd () from /path/libllama.so", "#3  f (a=1) at x.c:44".
_GDB_FRAME = re.compile(r"^#(?P<n>\d+)\s+(?:0x[0-9a-fA-F]+\s+in\s+)?(?P<rest>.+?)\s*$")
_GDB_FROM = re.compile(r"\s+from\s+(\S+)$")
_GDB_AT = re.compile(r"\s+at\s+\S+$")

# Frames of the crash machinery (the handler, raise, faulthandler) and of the interpreter below
# the native code: neither says what crashed.
_MACHINERY = re.compile(
    r"^(ggml_print_backtrace|__GI_raise|raise|gsignal|abort|__GI_abort|__pthread_kill\w*|"
    r"pthread_kill|__restore_rt|faulthandler\w*|__libc_message\w*|__GI___wait4|waitpid)$"
)
_INTERPRETER_LIB = re.compile(r"^(libpython|python|_ctypes|libffi)")
_INTERPRETER_FUNC = re.compile(r"^(_?Py|ffi_call|_call_function_pointer|_ctypes_callproc|cfunction)")
_LIBC = re.compile(r"^(libc|libpthread|libm)[.-]")

_SHOWN_FRAMES = 4


def parse_frames(log: str) -> list[Frame]:
    """Return the frames of the last native backtrace in `log`, outermost handler first."""
    blocks: list[list[Frame]] = []
    glibc_run = False  # the previous line was a glibc frame: the same block goes on
    for line in log.splitlines():
        line = line.strip()
        gdb = _GDB_FRAME.match(line)
        if gdb is not None:
            if gdb["n"] == "0" or not blocks:
                blocks.append([])
            blocks[-1].append(_gdb_frame(gdb["rest"]))
            glibc_run = False
            continue
        glibc = _GLIBC_FRAME.match(line)
        if glibc is not None:
            if not glibc_run:
                blocks.append([])
            library = Path(glibc["obj"]).name
            if glibc["sym"]:
                blocks[-1].append(Frame(glibc["sym"], library))
            else:  # unnamed: its offset tells the signal trampoline from other code
                blocks[-1].append(Frame(None, library, glibc["off"] or ""))
            glibc_run = True
            continue
        glibc_run = False  # gdb interleaves source lines inside its block; glibc never does
    return blocks[-1] if blocks else []


def _gdb_frame(rest: str) -> Frame:
    if rest == "<signal handler called>":
        return Frame(None, None, signal_frame=True)
    library = None
    found = _GDB_FROM.search(rest)
    if found is not None:
        library = Path(found[1]).name
        rest = rest[: found.start()]
    else:
        rest = _GDB_AT.sub("", rest)
    name = _without_arguments(rest.strip())
    return Frame(None if name == "??" else name, library)


def _without_arguments(name: str) -> str:
    """Drop the trailing argument list: "f (a=1, b=2)" -> "f", "A<(T)8>::g(int*)" -> "A<(T)8>::g"."""
    if not name.endswith(")"):
        return name
    depth = 0
    for i in range(len(name) - 1, -1, -1):
        if name[i] == ")":
            depth += 1
        elif name[i] == "(":
            depth -= 1
            if depth == 0:
                return name[:i].rstrip()
    return name


def crashed_frames(frames: list[Frame]) -> list[Frame]:
    """Return the frames from the one that crashed outwards, without the signal machinery.

    Empty when the backtrace is not the crashing thread's: gdb shows the main thread, which
    need not be the one that faulted (then it holds no signal frame).
    """
    signal_frames = [i for i, f in enumerate(frames) if f.signal_frame]
    handler = [i for i, f in enumerate(frames) if f.function == "ggml_print_backtrace"]
    if signal_frames:  # gdb marks the kernel's signal frames
        start = signal_frames[-1] + 1
    elif handler and handler[0] + 1 < len(frames):
        # glibc: the frame after the handler is the signal trampoline; the crash is right after
        # its last appearance (faulthandler raised the signal again from its own handler).
        trampoline = frames[handler[0] + 1]
        start = max(i for i, f in enumerate(frames) if f == trampoline) + 1
    else:
        return []
    rest = [f for f in frames[start:] if not (f.function and _MACHINERY.match(f.function))]
    # A crash inside libc (memcpy, strlen) is reported by the code that called it.
    own = [f for f in rest if not (f.library and _LIBC.match(f.library))]
    return own if own and not _is_interpreter(own[0]) else rest


def _is_interpreter(frame: Frame) -> bool:
    if frame.library and _INTERPRETER_LIB.match(frame.library):
        return True
    return bool(frame.function and _INTERPRETER_FUNC.match(frame.function))


def describe_crash(log: str, cpu: str | None = None) -> str | None:
    """Say which native function crashed, from a worker's log; None when it holds no backtrace.

    `cpu` is appended as "(cpu: ...)"; by default this host's, from /proc/cpuinfo.
    """
    chain: list[str] = []
    frames = crashed_frames(parse_frames(log))
    for frame in frames:
        if _is_interpreter(frame) or len(chain) == _SHOWN_FRAMES:
            break
        chain.append(_name(frame))
    if not chain:
        return None
    cpu = describe_cpu() if cpu is None else cpu
    return f"{_owner(frames[0])} crashed in {' <- '.join(chain)}" + (f" (cpu: {cpu})" if cpu else "")


def _name(frame: Frame) -> str:
    if frame.function is None:
        return f"{frame.library}{frame.offset}" if frame.library else "??"
    return _without_arguments(demangle(frame.function))


def _owner(frame: Frame) -> str:
    """Name what the crashed code belongs to: "llama.cpp", "torch", or its library."""
    label = (frame.library or "") + " " + (frame.function or "")
    if re.search(r"\b(libllama|libggml|libmtmd)|\b(_Z\w*)?(ggml|llama)", label):
        return "llama.cpp"
    if re.search(r"\b(libtorch|libc10)", label):
        return "torch"
    return frame.library or "native code"


@functools.cache
def _cxa_demangle() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    name = ctypes.util.find_library("stdc++")
    try:
        func = ctypes.CDLL(name or "libstdc++.so.6").__cxa_demangle
    except (OSError, AttributeError):
        return None
    func.restype = ctypes.c_void_p
    func.argtypes = [
        ctypes.c_char_p,
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.POINTER(ctypes.c_int),
    ]
    return func


def demangle(symbol: str) -> str:
    """Demangle a C++ symbol with libstdc++'s own demangler; other names come back unchanged."""
    func = _cxa_demangle() if symbol.startswith("_Z") else None
    if func is None:
        return symbol
    status = ctypes.c_int()
    out = func(symbol.encode(), None, None, ctypes.byref(status))
    if not out or status.value != 0:
        return symbol
    try:
        return ctypes.string_at(out).decode("utf-8", errors="replace")
    finally:
        ctypes.CDLL(None).free(ctypes.c_void_p(out))


# The flags that decide which of llama.cpp's (and torch's) CPU kernels run.
_SIMD_FLAG = re.compile(r"^(avx|amx|fma|f16c|asimd|sve|sme(?!p$)|i8mm|bf16|dotprod)")


def describe_cpu(cpuinfo: str | None = None) -> str:
    """Say which CPU this is and its SIMD flags, from /proc/cpuinfo: "AMD EPYC; avx avx2 ..."."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return os.uname().machine
    model = flags = ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = " ".join(f for f in value.split() if _SIMD_FLAG.match(f))
    return "; ".join(part for part in (model or os.uname().machine, flags) if part)
