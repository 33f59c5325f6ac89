"""A worker that crashes in native code is reported by the function that crashed and the CPU.

The parsing is checked on backtraces captured from real crashes (glibc's backtrace_symbols_fd
and gdb, the two ways ggml_print_backtrace prints); then real workers crash inside llama.cpp,
on their first decode and while loading (where llama-cpp-python has fds 1 and 2 on /dev/null).
The crash is brought in through the interpreter's own `sitecustomize` hook on the worker's
PYTHONPATH: the worker runs its production code unchanged, and llama.cpp faults for real.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from actors.errors import ModelLoadFailed, WorkerCrashed
from actors.types import GenerationParams, InferRequest
from actors.worker.native_crash import (
    Frame,
    crashed_frames,
    describe_cpu,
    describe_crash,
    parse_frames,
)
from tests.actors.worker.workers import run_request, worker_for

LIB = "/venv/lib/python3.11/site-packages/llama_cpp/lib"

# Captured from `llama_model_n_embd(NULL)` in a process set up as the worker sets itself up.
GLIBC = f"""\
Fatal Python error: Segmentation fault

Current thread 0x00007fcb15eaeb80 (most recent call first):
  File "/tmp/h1/exp.py", line 18 in <module>

{LIB}/libggml-base.so(+0x1b278)[0x7fcb0c54d278]
{LIB}/libggml-base.so(ggml_print_backtrace+0x1e4)[0x7fcb0c54d654]
/lib/x86_64-linux-gnu/libc.so.6(+0x3c050)[0x7fcb1565a050]
/lib/x86_64-linux-gnu/libc.so.6(+0x8aeec)[0x7fcb156a8eec]
/lib/x86_64-linux-gnu/libc.so.6(gsignal+0x12)[0x7fcb15659fb2]
/lib/x86_64-linux-gnu/libc.so.6(+0x3c050)[0x7fcb1565a050]
{LIB}/libllama.so(llama_model_n_embd+0x0)[0x7fcb14eaaeb0]
/lib/x86_64-linux-gnu/libffi.so.8(+0x6f7a)[0x7fcb15dc1f7a]
/lib/x86_64-linux-gnu/libffi.so.8(ffi_call+0xcd)[0x7fcb15dc1b0d]
/root/.pyenv/versions/3.11.7/lib/libpython3.11.so.1.0(_PyObject_MakeTpCall+0x7d)[0x7fcb1595861d]
.venv/bin/python(_start+0x21)[0x561ad102a081]
"""

GDB = f"""\
Fatal Python error: Segmentation fault

[Thread debugging using libthread_db enabled]
0x00007f2a816f1c17 in __GI___wait4 (pid=9746, stat_loc=0x0, options=0, usage=0x0) at ../sysdeps/unix/sysv/linux/wait4.c:30
30	../sysdeps/unix/sysv/linux/wait4.c: No such file or directory.
#0  0x00007f2a816f1c17 in __GI___wait4 (pid=9746, stat_loc=0x0, options=0, usage=0x0) at ../sysdeps/unix/sysv/linux/wait4.c:30
30	in ../sysdeps/unix/sysv/linux/wait4.c
#1  0x00007f2a7854d68b in ggml_print_backtrace () from {LIB}/libggml-base.so
#2  <signal handler called>
#3  __pthread_kill_implementation (threadid=<optimized out>, signo=signo@entry=11, no_tid=no_tid@entry=0) at ./nptl/pthread_kill.c:44
44	./nptl/pthread_kill.c: No such file or directory.
#4  0x00007f2a816a8f4f in __pthread_kill_internal (signo=11, threadid=<optimized out>) at ./nptl/pthread_kill.c:78
#5  0x00007f2a81659fb2 in __GI_raise (sig=11) at ../sysdeps/posix/raise.c:26
#6  <signal handler called>
#7  0x00007f2a80eaaeb0 in llama_model_n_embd () from {LIB}/libllama.so
#8  0x00007f2a8125ff7a in ?? () from /lib/x86_64-linux-gnu/libffi.so.8
#10 0x00007f2a8125fb0d in ffi_call () from /lib/x86_64-linux-gnu/libffi.so.8
#12 _ctypes_callproc (pProc=0x7f2a80eaaeb0 <llama_model_n_embd>, argtuple=argtuple@entry=0x7f2a81084430) at /tmp/Python-3.11.7/Modules/_ctypes/callproc.c:1262
"""

# A C++ kernel deeper in llama.cpp, as glibc names it (mangled; the symbol is libggml-cpu's).
KERNEL = f"""\
{LIB}/libggml-base.so(ggml_print_backtrace+0x1e4)[0x7fcb0c54d654]
/lib/x86_64-linux-gnu/libc.so.6(+0x3c050)[0x7fcb1565a050]
{LIB}/libggml-cpu.so(_ZN4ggml3cpu6repack13tensor_traitsI10block_q1_0Ll4ELl4EL9ggml_type8EE15compute_forwardEP19ggml_compute_paramsP11ggml_tensor+0x52)[0x7f0000000052]
{LIB}/libggml-cpu.so(ggml_graph_compute+0x9a)[0x7f000000009a]
{LIB}/libllama.so(llama_decode+0x1d)[0x7f000000001d]
"""

XEON = """\
processor	: 0
vendor_id	: GenuineIntel
model name	: Intel(R) Xeon(R) Platinum 8480+
flags		: fpu vme sse4_2 smep avx f16c fma avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""

GRAVITON = """\
processor	: 0
BogoMIPS	: 243.75
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm asimddp sve i8mm bf16
CPU part	: 0xd40
"""


@pytest.mark.parametrize("log", [GLIBC, GDB], ids=["glibc", "gdb"])
def test_the_function_that_faulted_is_found_past_the_signal_machinery(log: str) -> None:
    frames = crashed_frames(parse_frames(log))
    assert frames[0] == Frame("llama_model_n_embd", "libllama.so")
    assert describe_crash(log, cpu="X") == "llama.cpp crashed in llama_model_n_embd (cpu: X)"


def test_a_cpp_kernel_is_demangled_and_shown_with_its_callers() -> None:
    assert describe_crash(KERNEL, cpu="") == (
        "llama.cpp crashed in "
        "ggml::cpu::repack::tensor_traits<block_q1_0, 4l, 4l, (ggml_type)8>::compute_forward"
        " <- ggml_graph_compute <- llama_decode"
    )


def test_a_gdb_stack_of_another_thread_than_the_faulting_one_names_nothing() -> None:
    # gdb shows the main thread; when a ggml worker thread faulted, it holds no signal frame.
    main_thread = f"""\
#0  0x00007f2a816f1c17 in __GI___wait4 (pid=9746) at ../sysdeps/unix/sysv/linux/wait4.c:30
#1  0x00007f2a7854d68b in ggml_graph_compute_thread () from {LIB}/libggml-cpu.so
#2  0x00007f2a7854d68b in llama_decode () from {LIB}/libllama.so
"""
    assert describe_crash(main_thread, cpu="X") is None


def test_a_log_with_only_a_python_stack_names_no_native_function() -> None:
    log = 'Fatal Python error: Segmentation fault\n\n  File "x.py", line 3 in <module>\n'
    assert describe_crash(log, cpu="X") is None


@pytest.mark.parametrize(
    ("cpuinfo", "expected"),
    [
        (
            XEON,
            "Intel(R) Xeon(R) Platinum 8480+; avx f16c fma avx2 avx512f avx512_vnni avx512_bf16 "
            "amx_bf16 amx_tile amx_int8",
        ),
        (GRAVITON, "; asimd asimdhp asimdrdm asimddp sve i8mm bf16"),
    ],
    ids=["xeon-with-amx", "arm-features"],
)
def test_the_cpu_is_described_by_its_model_and_simd_flags(cpuinfo: str, expected: str) -> None:
    described = describe_cpu(cpuinfo)
    assert described.endswith(expected)
    assert "smep" not in described and "sse4_2" not in described


CRASH_ON_DECODE = """
    import llama_cpp.llama_cpp as lib

    def crash(ctx, batch):
        return lib.llama_model_n_embd(None)  # llama.cpp reads through a null model: SIGSEGV

    lib.llama_decode = crash  # the worker's first decode
"""

CRASH_WHILE_LOADING = """
    import llama_cpp.llama_cpp as lib

    def crash(path, params):
        return lib.llama_model_n_embd(None)  # inside llama-cpp-python's silenced load

    lib.llama_model_load_from_file = crash
"""


def crash_in_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: str) -> None:
    """Have the next worker started run `code` at interpreter start (sitecustomize)."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent(code))
    monkeypatch.setenv("PYTHONPATH", str(hook))


@pytest.fixture(params=["as-is", "no-debugger"])
def debugger(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run with PATH as it is (gdb prints the stack where installed) or without gdb and lldb
    (glibc's backtrace_symbols_fd prints it)."""
    if request.param == "no-debugger":
        monkeypatch.setenv("PATH", "/nonexistent")
    return str(request.param)


def test_a_crash_on_the_first_decode_names_the_native_function_and_the_cpu(
    tiny_gguf: Path,
    tmp_path: Path,
    runtime_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    debugger: str,
) -> None:
    crash_in_worker(tmp_path, monkeypatch, CRASH_ON_DECODE)
    worker = worker_for(tiny_gguf, runtime_dir, "victim", n_ctx=256, n_threads=1)
    try:
        worker.start(timeout=60)
        with pytest.raises(WorkerCrashed) as err:
            run_request(
                worker, InferRequest(model="victim", prompt="hi", params=GenerationParams(4))
            )
    finally:
        worker.stop()
    message = str(err.value)
    assert message.startswith("worker for victim died (signal 11 (SIGSEGV)): ")
    assert "llama.cpp crashed in llama_model_n_embd" in message
    assert f"(cpu: {describe_cpu()})" in message
    assert worker.log_path is not None and f"log: {worker.log_path}" in message
    log = worker.log_path.read_text()
    assert "Fatal Python error: Segmentation fault" in log  # faulthandler, then the native stack
    if debugger == "no-debugger":
        assert re.search(r"libllama\.so\(llama_model_n_embd\+0x[0-9a-f]+\)", log)


def test_a_crash_while_loading_names_the_native_function_though_stderr_was_silenced(
    tiny_gguf: Path, tmp_path: Path, runtime_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    crash_in_worker(tmp_path, monkeypatch, CRASH_WHILE_LOADING)
    monkeypatch.setenv("PATH", "/nonexistent")  # glibc's printer: it writes to fd 2
    worker = worker_for(tiny_gguf, runtime_dir, "victim", n_ctx=256, n_threads=1)
    with pytest.raises(ModelLoadFailed) as err:
        worker.start(timeout=60)
    message = str(err.value)
    assert "exited (signal 11 (SIGSEGV)) while loading: " in message
    assert "llama.cpp crashed in llama_model_n_embd" in message
    assert f"(cpu: {describe_cpu()})" in message
