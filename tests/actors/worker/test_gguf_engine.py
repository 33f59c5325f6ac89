"""The continuous-batching engine on real llama.cpp, with generated f32 models.

The models' output rows are zero except for printable ASCII (actors/gguf_synth.py), so greedy
text is printable, one byte per token, and runs to max_tokens: texts compare byte for byte.
"One at a time" is each request alone on a fresh one-slot engine. With flash attention off the
engine also equals llama-cpp-python's `Llama.create_completion` (its default: flash attention
off), an independent implementation; with it on (llama.cpp's choice on the CPU) llama.cpp's
attention rounds differently, so the engine is compared with itself there.
"""

from __future__ import annotations

import select
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest

from actors.gguf_synth import CHATML_TEMPLATE, SIZES, write_preset
from actors.learning.export import write_lora_adapter
from actors.types import ChatMessage, GenerationParams
from actors.worker.backends import BackendError, BadRequest
from actors.worker.backends.gguf import open_llama
from actors.worker.backends.gguf_engine import Finish, GgufEngine, Request
from actors.worker.backends.sampling import MIN_P, TOP_K
from actors.worker.backends.slots import common_prefix
from actors.worker.native_crash import describe_cpu
from actors.worker.protocol import LoadSpec

N_CTX = 256
GREEDY = GenerationParams(max_tokens=24, temperature=0.0)
PROMPTS = (
    "The quick brown fox",
    "Hello",
    "abc",
    "The quick brown dog jumps",
    "Lorem ipsum dolor sit amet, consectetur adipiscing elit, " * 2,
    "zz",
)
SEEDED = tuple(
    GenerationParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=s) for s in (1, 2, 3)
)

# llama.cpp repacks q4_0 on x86 with AVX2, on Arm with NEON dot products, into AMX tiles on AMX.
REPACKS_Q4_0 = any(flag in describe_cpu().split() for flag in ("avx2", "asimddp", "amx_int8"))

MakeEngine = Callable[..., GgufEngine]  # (parallel, step_tokens=64, flash_attn=None) -> engine
OneAtATime = Callable[..., str]  # (prompt, sampling=GREEDY) -> the text of the request alone


def spec(path: Path) -> LoadSpec:
    return LoadSpec(backend="gguf", path=str(path), n_ctx=N_CTX, n_threads=1)


@pytest.fixture
def engine_for(small_gguf: Path) -> Iterator[MakeEngine]:
    """Make engines on the small model; close them all at teardown."""
    made: list[GgufEngine] = []

    def make(parallel: int, step_tokens: int = 64, flash_attn: bool | None = None) -> GgufEngine:
        engine = GgufEngine.load(
            spec(small_gguf), parallel=parallel, step_tokens=step_tokens, flash_attn=flash_attn
        )
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close()


@pytest.fixture(scope="module")
def one_at_a_time(small_gguf: Path) -> OneAtATime:
    """Return the text of a request run alone on a fresh one-slot engine (remembered)."""
    texts: dict[tuple[str, GenerationParams], str] = {}

    def run(prompt: str, s: GenerationParams = GREEDY) -> str:
        if (prompt, s) not in texts:
            engine = GgufEngine.load(spec(small_gguf), parallel=1)
            try:
                record = submit(engine, prompt, s)
                drain(engine)
                texts[prompt, s] = finished(record).text
            finally:
                engine.close()
        return texts[prompt, s]

    return run


def llama_python(path: Path, **kwargs: Any) -> Any:
    """llama-cpp-python's `Llama` on `path`, loaded as the engine loads it (n_ctx, one thread)."""
    load = {"model_path": str(path), "n_ctx": N_CTX, "n_threads": 1, "n_threads_batch": 1}
    return open_llama(llama_cpp, {**load, "verbose": False, **kwargs}, cpu_repack=False)


def completion_text(llm: Any, prompt: str, s: GenerationParams) -> str:
    """`create_completion` with the engine's sampler chain (its defaults named explicitly)."""
    out = llm.create_completion(
        prompt,
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=TOP_K,
        min_p=MIN_P,
        repeat_penalty=1.0,
        seed=s.seed,
    )
    return str(out["choices"][0]["text"])


@pytest.fixture(scope="module")
def backend_text(small_gguf: Path) -> Iterator[OneAtATime]:
    """Return llama-cpp-python's text for a prompt and sampling."""
    llm = llama_python(small_gguf)

    def run(prompt: str, s: GenerationParams = GREEDY) -> str:
        return completion_text(llm, prompt, s)

    yield run
    llm.close()


class Record:
    """A request's emitted pieces and its Finish."""

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.finish: Finish | None = None
        self.request: Request | None = None

    def emit(self, piece: str) -> None:
        self.pieces.append(piece)

    def done(self, finish: Finish) -> None:
        assert self.finish is None, "done called twice"
        self.finish = finish


def submit(engine: GgufEngine, prompt: str, s: GenerationParams = GREEDY) -> Record:
    record = Record()
    record.request = engine.submit(prompt, s, emit=record.emit, done=record.done)
    return record


def drain(engine: GgufEngine, max_steps: int = 10_000) -> int:
    """Step until no work is left; return the steps taken."""
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        assert steps < max_steps, "the engine never ran out of work"
    return steps


def finished(record: Record) -> Finish:
    assert record.finish is not None, "the request never finished"
    return record.finish


def texts_of(records: list[Record]) -> list[str]:
    return [finished(r).text for r in records]


def test_greedy_outputs_of_requests_run_concurrently_equal_the_same_requests_run_one_at_a_time(
    engine_for: MakeEngine, one_at_a_time: OneAtATime
) -> None:
    engine = engine_for(parallel=4, step_tokens=16)  # 6 requests: two queue; prompts chunk
    records = [submit(engine, p) for p in PROMPTS]
    drain(engine)
    for prompt, record in zip(PROMPTS, records, strict=True):
        f = finished(record)
        assert f.text == one_at_a_time(prompt), prompt
        assert f.finish_reason == "length" and f.tokens_generated == GREEDY.max_tokens
        assert "".join(record.pieces) == f.text
        assert f.error == ""


def test_seeded_sampling_under_concurrency_equals_each_request_alone(
    engine_for: MakeEngine, one_at_a_time: OneAtATime
) -> None:
    engine = engine_for(parallel=3)
    records = [submit(engine, "The quick brown fox", s) for s in SEEDED]
    drain(engine)
    texts = [finished(r).text for r in records]
    assert texts == [one_at_a_time("The quick brown fox", s) for s in SEEDED]
    assert len(set(texts)) == 3  # each sequence drew from its own seeded chain


def test_with_flash_attention_off_concurrent_texts_equal_the_one_at_a_time_backend(
    engine_for: MakeEngine, backend_text: OneAtATime
) -> None:
    engine = engine_for(parallel=4, step_tokens=16, flash_attn=False)
    greedy = [submit(engine, p) for p in PROMPTS]
    seeded = [submit(engine, "The quick brown fox", s) for s in SEEDED]
    drain(engine)
    assert texts_of(greedy) == [backend_text(p) for p in PROMPTS]
    assert texts_of(seeded) == [backend_text("The quick brown fox", s) for s in SEEDED]


def test_cancelling_one_sequence_leaves_the_others_outputs_unchanged(
    engine_for: MakeEngine, one_at_a_time: OneAtATime
) -> None:
    engine = engine_for(parallel=3)
    records = [submit(engine, p) for p in PROMPTS[:3]]
    for _ in range(6):
        engine.step()
    victim = records[1]
    assert victim.request is not None and engine.cancel(victim.request)
    drain(engine)
    cancelled = finished(victim)
    assert cancelled.finish_reason == "cancelled"
    assert 0 < cancelled.tokens_generated < GREEDY.max_tokens
    assert one_at_a_time(PROMPTS[1]).startswith(cancelled.text)
    for i in (0, 2):
        assert finished(records[i]).text == one_at_a_time(PROMPTS[i])
    assert not engine.cancel(victim.request)  # already over: nothing to cancel


def test_a_request_cancelled_from_another_requests_callback_is_not_sampled_again(
    engine_for: MakeEngine, one_at_a_time: OneAtATime
) -> None:
    engine = engine_for(parallel=2)
    victim = submit(engine, PROMPTS[1])
    killer = Record()

    def emit(piece: str) -> None:
        killer.emit(piece)
        if len(killer.pieces) == 3:
            assert victim.request is not None
            engine.cancel(victim.request)

    killer.request = engine.submit(PROMPTS[0], GREEDY, emit=emit, done=killer.done)
    drain(engine)
    assert finished(victim).finish_reason == "cancelled"
    assert finished(killer).text == one_at_a_time(PROMPTS[0])


def test_a_slot_reused_by_a_different_prompt_gives_the_same_output_as_a_fresh_engine(
    engine_for: MakeEngine, one_at_a_time: OneAtATime
) -> None:
    engine = engine_for(parallel=1)
    long_first = submit(engine, PROMPTS[4])  # leaves ~150 tokens of KV in the one slot
    drain(engine)
    second = submit(engine, PROMPTS[2])  # shares only BOS with what the slot holds
    drain(engine)
    f = finished(second)
    assert f.prompt_tokens_reused == 1  # BOS
    assert f.error == "" and f.text == one_at_a_time(PROMPTS[2])
    assert finished(long_first).text == one_at_a_time(PROMPTS[4])
    # What the slot holds now is exactly the second prompt and the tokens decoded after it.
    held = engine.slot_tokens(0)
    assert len(held) == f.prompt_tokens + f.tokens_generated - 1
    assert list(held[: f.prompt_tokens]) == engine.prompt_tokens(PROMPTS[2])


def test_prefix_reuse_decodes_only_the_remainder_and_gives_the_same_greedy_output(
    engine_for: MakeEngine, one_at_a_time: OneAtATime
) -> None:
    history = "System: answer briefly. User: tell me about foxes. Assistant: "
    engine = engine_for(parallel=2)
    first = submit(engine, history)
    other = submit(engine, "An unrelated conversation")
    drain(engine)
    first_text = finished(first).text
    follow_up = history + first_text + " User: and dogs? Assistant: "
    before = engine.decoded_tokens
    second = submit(engine, follow_up)
    drain(engine)
    f = finished(second)
    n_prompt = len(engine.prompt_tokens(follow_up))
    # The slot held the history and all but the last generated token; that token and the new
    # turn are all that was decoded, plus the generated tokens but the last.
    assert f.prompt_tokens_reused == len(engine.prompt_tokens(history)) + GREEDY.max_tokens - 1
    assert engine.decoded_tokens - before == (n_prompt - f.prompt_tokens_reused) + (
        f.tokens_generated - 1
    )
    assert f.text == one_at_a_time(follow_up)
    assert finished(other).prompt_tokens_reused == 0


def test_a_conversation_evicted_by_a_one_off_takes_its_slot_back_and_evicts_no_other(
    engine_for: MakeEngine, one_at_a_time: OneAtATime
) -> None:
    # Two conversations, each back once; a one-off prompt (a warm-up, a probe) evicts the first.
    # When it comes back it takes the one-off's slot, not the second's (the least recently
    # used), and the second still finds its whole prompt cached.
    engine = engine_for(parallel=2)
    one_token = GenerationParams(max_tokens=1, temperature=0.0)
    for prompt in (PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[1], PROMPTS[2]):
        submit(engine, prompt, one_token)
        drain(engine)
    back = submit(engine, PROMPTS[0])  # onto the one-off's KV, cut to what they share
    drain(engine)
    shared = common_prefix(engine.prompt_tokens(PROMPTS[0]), engine.prompt_tokens(PROMPTS[2]))
    assert finished(back).prompt_tokens_reused == shared
    assert finished(back).text == one_at_a_time(PROMPTS[0])
    second = submit(engine, PROMPTS[1], one_token)
    drain(engine)
    assert finished(second).prompt_tokens_reused == len(engine.prompt_tokens(PROMPTS[1]))


def test_a_slot_taken_back_from_a_one_off_is_not_taken_back_by_it_in_turn(
    engine_for: MakeEngine,
) -> None:
    # Found by review: a take-back counted as a fresh eviction, so the one-off, when it came
    # again, took the slot back in turn, and the two evicted each other from one slot forever.
    engine = engine_for(parallel=2)
    one_token = GenerationParams(max_tokens=1, temperature=0.0)
    # The one-off evicts the first conversation, which takes its slot back (the most recently
    # used one now); the one-off again evicts the least recently used slot, the second's.
    for prompt in (PROMPTS[0], PROMPTS[1], PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0]):
        submit(engine, prompt, one_token)
        drain(engine)
    submit(engine, PROMPTS[2], one_token)
    drain(engine)
    again = submit(engine, PROMPTS[0], one_token)
    drain(engine)
    assert finished(again).prompt_tokens_reused == len(engine.prompt_tokens(PROMPTS[0]))


def test_the_same_prompt_again_decodes_none_of_it_and_samples_as_a_fresh_decode_does(
    engine_for: MakeEngine, one_at_a_time: OneAtATime
) -> None:
    engine = engine_for(parallel=1)
    n_prompt = len(engine.prompt_tokens(PROMPTS[0]))
    one_token = GenerationParams(max_tokens=1, temperature=0.0)
    first = submit(engine, PROMPTS[0], one_token)
    drain(engine)
    before = engine.decoded_tokens
    again = submit(engine, PROMPTS[0], one_token)  # what an agent repeating itself sends
    drain(engine)
    assert engine.decoded_tokens == before  # llama.cpp decoded nothing: the saved logits served
    assert finished(again).prompt_tokens_reused == n_prompt
    assert finished(again).text == finished(first).text == one_at_a_time(PROMPTS[0])[:1]
    # A longer request on the saved logits decodes only its own tokens, greedy or seeded.
    for s in (GREEDY, SEEDED[0]):
        before = engine.decoded_tokens
        long = submit(engine, PROMPTS[0], s)
        drain(engine)
        f = finished(long)
        assert f.prompt_tokens_reused == n_prompt
        assert engine.decoded_tokens - before == f.tokens_generated - 1
        assert f.text == one_at_a_time(PROMPTS[0], s)


def test_a_slot_that_fills_a_gap_in_a_step_keeps_its_cache_exactly(
    engine_for: MakeEngine, one_at_a_time: OneAtATime
) -> None:
    # Slots 0 and 2 decode while slot 1 sits between them: slot 1 takes a throwaway token each
    # step (so the step is one pass, see slots.gap_fillers), and must hold the same KV after,
    # idle or starting a request whose prompt it holds (sampled from saved logits, its first
    # step decodes nothing of it, and its next decodes right where the throwaway token was).
    engine = engine_for(parallel=3)
    first = [submit(engine, p) for p in PROMPTS[:3]]  # slots 0, 1, 2
    drain(engine)
    held = engine.slot_tokens(1)
    outer = [submit(engine, PROMPTS[0]), submit(engine, PROMPTS[2])]  # back in slots 0 and 2
    before = engine.decoded_tokens
    engine.step()
    engine.step()
    assert engine.filler_tokens > 0
    assert engine.slot_tokens(1) == held
    again = submit(engine, PROMPTS[1])  # its whole prompt is still in slot 1, logits and all
    drain(engine)
    f = finished(again)
    assert f.prompt_tokens_reused == f.prompt_tokens
    assert engine.decoded_tokens - before == sum(
        finished(r).tokens_generated - 1 for r in (*outer, again)
    )
    assert f.text == finished(first[1]).text == one_at_a_time(PROMPTS[1])
    assert texts_of(outer) == [one_at_a_time(p) for p in (PROMPTS[0], PROMPTS[2])]


def test_a_cached_prompts_first_token_leaves_before_the_decode_and_its_second_comes_from_it(
    engine_for: MakeEngine, one_at_a_time: OneAtATime
) -> None:
    engine = engine_for(parallel=2)
    submit(engine, PROMPTS[0])
    drain(engine)
    other = submit(engine, PROMPTS[1])
    engine.step()  # other's prompt: from here on every step decodes its next token
    again = submit(engine, PROMPTS[0])  # all of it cached, logits too
    produced_at_flush: list[int] = []

    def flush() -> None:
        assert again.request is not None
        produced_at_flush.append(again.request.produced)

    before = engine.decoded_tokens
    engine.step(flush)
    assert again.request is not None
    assert produced_at_flush == [1]  # sampled from the saved logits, before the decode
    assert again.request.produced == 2  # its first token was decoded in this same step
    assert engine.decoded_tokens - before == 2  # with other's next token
    drain(engine)
    assert finished(again).text == one_at_a_time(PROMPTS[0])
    assert finished(other).text == one_at_a_time(PROMPTS[1])


def held_decode(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Make llama_decode say when it is entered (first event) and wait for the second before
    decoding: what runs beside it in between provably overlaps it."""
    inside, go = threading.Event(), threading.Event()
    decode = llama_cpp.llama_cpp.llama_decode

    def held(ctx: Any, batch: Any) -> int:
        inside.set()
        assert go.wait(10)
        return int(decode(ctx, batch))

    monkeypatch.setattr(llama_cpp.llama_cpp, "llama_decode", held)
    return inside, go


def test_beside_a_decode_a_cached_prompt_starts_at_once_and_any_other_waits_for_the_step(
    engine_for: MakeEngine, one_at_a_time: OneAtATime, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = engine_for(parallel=4)
    for prompt in PROMPTS[:2]:
        submit(engine, prompt)
    drain(engine)  # slots 0 and 1 hold these prompts, their logits and their answers' KV
    running = [submit(engine, PROMPTS[2]), submit(engine, PROMPTS[5])]
    engine.step()  # slots 2 and 3: their prompts; from here on each step decodes two tokens
    seen: dict[str, Any] = {}
    inside, admitted = held_decode(monkeypatch)

    def during(decoded_fd: int) -> None:  # on the engine's other thread, while it decodes
        assert inside.wait(10)  # the main thread is in llama_decode now, and stays there
        cached = submit(engine, PROMPTS[0])  # all of it in slot 0, outside the decode
        fresh = submit(engine, PROMPTS[3])  # nothing of it cached: waits for the next step
        seen["admitted"] = engine.admit_cached()
        assert cached.request is not None and fresh.request is not None
        seen["first_tokens"] = (cached.request.produced, fresh.request.produced)
        seen["records"] = (cached, fresh)
        admitted.set()
        select.select([decoded_fd], [], [])

    engine.step(during=during)
    assert seen["admitted"] is True
    assert seen["first_tokens"] == (1, 0)  # the cached one's first token came during the decode
    drain(engine)
    cached, fresh = seen["records"]
    assert finished(cached).prompt_tokens_reused == finished(cached).prompt_tokens
    # Its slot's KV was cut back to the prompt after the decode: its text is the one alone.
    assert finished(cached).text == one_at_a_time(PROMPTS[0])
    assert finished(fresh).text == one_at_a_time(PROMPTS[3])
    assert texts_of(running) == [one_at_a_time(p) for p in (PROMPTS[2], PROMPTS[5])]


def test_a_step_of_one_token_decodes_without_the_thread_beside(engine_for: MakeEngine) -> None:
    engine = engine_for(parallel=2)
    record = submit(engine, PROMPTS[0])
    engine.step()  # its prompt: more than one token, so `during` runs
    calls: list[int] = []

    def during(decoded_fd: int) -> None:
        calls.append(decoded_fd)
        select.select([decoded_fd], [], [])

    engine.step(during=during)  # its next token alone
    assert calls == [] and record.request is not None and record.request.produced == 2


def test_a_step_of_one_token_that_just_admitted_a_request_keeps_the_thread_beside(
    engine_for: MakeEngine,
) -> None:
    # More of a burst may be on its way: they start during the decode, not after it.
    engine = engine_for(parallel=2)
    submit(engine, PROMPTS[0], GenerationParams(max_tokens=1, temperature=0.0))
    drain(engine)  # slot 0 holds the prompt and its logits
    again = submit(engine, PROMPTS[0])
    calls: list[int] = []

    def during(decoded_fd: int) -> None:
        calls.append(decoded_fd)
        select.select([decoded_fd], [], [])

    engine.step(during=during)  # its first token from the saved logits; one token decoded
    assert len(calls) == 1 and again.request is not None and again.request.produced == 2


def test_beside_a_decode_a_cached_prompt_may_take_a_slot_that_fills_a_gap_in_it(
    engine_for: MakeEngine, one_at_a_time: OneAtATime
) -> None:
    engine = engine_for(parallel=3)
    for prompt in PROMPTS[:3]:
        submit(engine, prompt)
    drain(engine)  # slots 0, 1, 2
    outer = [submit(engine, PROMPTS[0]), submit(engine, PROMPTS[2])]
    engine.step()  # slots 0 and 2 run: from now on slot 1 fills the gap between them
    seen: dict[str, Any] = {}

    def during(decoded_fd: int) -> None:
        middle = submit(engine, PROMPTS[1])  # all of it in slot 1, which holds a filler now
        seen["admitted"] = engine.admit_cached()
        assert middle.request is not None and middle.request.slot is not None
        seen["slot"] = middle.request.slot.index
        seen["middle"] = middle
        select.select([decoded_fd], [], [])

    fillers = engine.filler_tokens
    engine.step(during=during)
    assert engine.filler_tokens > fillers and seen["admitted"] is True and seen["slot"] == 1
    drain(engine)
    assert finished(seen["middle"]).text == one_at_a_time(PROMPTS[1])
    assert texts_of(outer) == [one_at_a_time(p) for p in (PROMPTS[0], PROMPTS[2])]


def test_an_error_beside_a_decode_surfaces_after_the_step_and_the_streams_go_on(
    engine_for: MakeEngine, one_at_a_time: OneAtATime
) -> None:
    engine = engine_for(parallel=2)
    streams = [submit(engine, PROMPTS[0]), submit(engine, PROMPTS[2])]
    engine.step()

    def during(decoded_fd: int) -> None:
        select.select([decoded_fd], [], [])
        raise RuntimeError("a bug beside the decode")

    with pytest.raises(RuntimeError, match="a bug beside the decode"):
        engine.step(during=during)
    drain(engine)  # the step's tokens were taken in: the next steps decode where they should
    assert texts_of(streams) == [one_at_a_time(p) for p in (PROMPTS[0], PROMPTS[2])]


def test_saved_logits_never_outlive_the_kv_they_follow(
    engine_for: MakeEngine, one_at_a_time: OneAtATime
) -> None:
    # A prompt, then a prefix of it (which cuts the slot's KV below the saved logits), then the
    # first prompt again: it must be decoded, not sampled from the logits of the other prompt.
    engine = engine_for(parallel=1)
    whole, head = PROMPTS[3], PROMPTS[3][:13]
    texts = []
    for prompt in (whole, head, whole):
        record = submit(engine, prompt)
        before = engine.decoded_tokens
        drain(engine)
        f = finished(record)
        assert engine.decoded_tokens - before >= f.tokens_generated  # its last prompt token too
        texts.append(f.text)
    assert texts == [one_at_a_time(whole), one_at_a_time(head), one_at_a_time(whole)]


def test_stop_sequences_and_max_tokens_apply_to_each_sequence_alone(
    engine_for: MakeEngine, one_at_a_time: OneAtATime
) -> None:
    engine = engine_for(parallel=3)
    full = one_at_a_time(PROMPTS[0])
    stop = full[10:13]
    cut = full.index(stop)
    stopped = submit(
        engine, PROMPTS[0], GenerationParams(max_tokens=24, temperature=0.0, stop=(stop,))
    )
    short = submit(engine, PROMPTS[1], GenerationParams(max_tokens=7, temperature=0.0))
    plain = submit(engine, PROMPTS[2])
    drain(engine)
    s = finished(stopped)
    assert s.finish_reason == "stop" and s.text == full[:cut]
    assert "".join(stopped.pieces) == full[:cut]  # the stop sequence was never streamed
    f = finished(short)
    assert f.finish_reason == "length" and f.tokens_generated == 7
    assert f.text == one_at_a_time(PROMPTS[1])[:7]
    assert finished(plain).text == one_at_a_time(PROMPTS[2])


def test_no_step_decodes_more_than_step_tokens_and_streams_keep_moving_during_a_long_prefill(
    engine_for: MakeEngine,
) -> None:
    engine = engine_for(parallel=3, step_tokens=8)
    running = submit(engine, PROMPTS[1], GenerationParams(max_tokens=40, temperature=0.0))
    while not running.pieces:
        assert engine.step() <= 8
    long_prompt = submit(engine, PROMPTS[4])  # ~120 tokens: 18 steps of 7
    n_long = len(engine.prompt_tokens(PROMPTS[4]))
    steps = 0
    while not long_prompt.pieces:
        pieces_before = len(running.pieces)
        assert engine.step() <= 8
        steps += 1
        assert len(running.pieces) == pieces_before + 1  # one token every step, prefill or not
    assert steps >= n_long // 7
    drain(engine)


def test_requests_beyond_the_slots_wait_and_start_in_arrival_order(engine_for: MakeEngine) -> None:
    engine = engine_for(parallel=2)
    steps_run = 0
    started: list[int] = []

    def submit_watching(i: int, max_tokens: int) -> Record:
        record = Record()

        def emit(piece: str) -> None:
            if not record.pieces:
                started.append(i)
            record.emit(piece)

        record.request = engine.submit(
            PROMPTS[i],
            GenerationParams(max_tokens=max_tokens, temperature=0.0),
            emit=emit,
            done=record.done,
        )
        return record

    records = [submit_watching(i, 5 + 3 * i) for i in range(5)]
    assert engine.queue_depth == 5 and engine.slots_busy == 0
    engine.step()
    steps_run += 1
    assert engine.queue_depth == 3 and engine.slots_busy == 2
    drain(engine)
    assert started == [0, 1, 2, 3, 4]
    assert all(finished(r).tokens_generated == 5 + 3 * i for i, r in enumerate(records))
    assert engine.queue_depth == 0 and engine.slots_busy == 0


def test_a_queued_request_cancelled_before_it_starts_ends_at_once(engine_for: MakeEngine) -> None:
    engine = engine_for(parallel=1)
    first = submit(engine, PROMPTS[0])
    queued = submit(engine, PROMPTS[1])
    engine.step()
    assert queued.request is not None and engine.cancel(queued.request)
    f = finished(queued)
    assert f.finish_reason == "cancelled" and f.tokens_generated == 0 and f.text == ""
    drain(engine)
    assert finished(first).finish_reason == "length"


def test_a_prompt_longer_than_a_slots_context_is_refused_naming_the_field(
    engine_for: MakeEngine,
) -> None:
    engine = engine_for(parallel=2)
    with pytest.raises(BadRequest) as caught:
        engine.submit(
            "x" * N_CTX, GREEDY, emit=lambda _: None, done=lambda _: None, field="messages"
        )
    assert caught.value.field == "messages"
    assert f"the context holds {N_CTX}" in caught.value.message
    assert not engine.has_work()


def test_generation_stops_at_the_end_of_a_slots_context(engine_for: MakeEngine) -> None:
    engine = engine_for(parallel=2)
    prompt = "y" * (N_CTX - 6)
    record = submit(engine, prompt, GenerationParams(max_tokens=50, temperature=0.0))
    drain(engine)
    f = finished(record)
    assert f.finish_reason == "length"
    assert f.prompt_tokens + f.tokens_generated == N_CTX


def test_closing_the_engine_cancels_what_runs_and_what_waits(small_gguf: Path) -> None:
    engine = GgufEngine.load(spec(small_gguf), parallel=1)
    running = submit(engine, PROMPTS[0])
    waiting = submit(engine, PROMPTS[1])
    engine.step()
    engine.close()
    assert finished(running).finish_reason == "cancelled"
    assert finished(waiting).finish_reason == "cancelled"
    engine.close()  # twice is harmless


def test_token_ids_outside_the_vocabulary_are_refused_naming_the_field(
    engine_for: MakeEngine,
) -> None:
    engine = engine_for(parallel=1)
    with pytest.raises(BadRequest) as caught:
        engine.submit([1, 10**6], GREEDY, emit=lambda _: None, done=lambda _: None)
    assert caught.value.field == "prompt" and "outside the vocabulary" in caught.value.message
    assert not engine.has_work()


def test_a_failed_decode_fails_the_requests_of_that_batch_and_the_engine_serves_on(
    engine_for: MakeEngine, one_at_a_time: OneAtATime
) -> None:
    engine = engine_for(parallel=2)
    records = [submit(engine, p) for p in PROMPTS[:2]]
    for _ in range(3):
        engine.step()
    victim = records[0].request
    assert victim is not None and victim.slot is not None
    # A fault inside llama.cpp, simulated: the sequence loses KV behind the engine's back, so
    # llama.cpp refuses the next batch (its positions no longer follow on).
    engine._lib.llama_memory_seq_rm(engine._mem, victim.slot.index, 2, -1)
    engine.step()
    for record in records:
        f = finished(record)
        assert f.finish_reason == "cancelled" and "llama_decode returned" in f.error
    assert not engine.has_work() and engine.slot_tokens(0) == engine.slot_tokens(1) == ()
    after = submit(engine, PROMPTS[2])
    drain(engine)
    assert finished(after).text == one_at_a_time(PROMPTS[2])


def test_cpu_weights_are_repacked_only_when_asked(tmp_path: Path) -> None:
    """Off (the default), q4_0 weights stay in the file's layout and decode; on, llama.cpp
    repacks them where the CPU can (no decode then: on AMX hosts that matmul crashes)."""
    path = write_preset(tmp_path / "small-q4_0.gguf", "small", seed=3, dtype="q4_0")
    off = GgufEngine.load(spec(path), parallel=2)
    try:
        assert off.weight_buffers and not {"CPU_REPACK", "AMX"} & set(off.weight_buffers)
        record = submit(off, PROMPTS[0], GenerationParams(max_tokens=4, temperature=0.0))
        drain(off)
        assert finished(record).tokens_generated == 4
    finally:
        off.close()
    if not REPACKS_Q4_0:
        return
    on = GgufEngine.load(replace(spec(path), cpu_repack=True), parallel=2)
    try:
        assert {"CPU_REPACK", "AMX"} & set(on.weight_buffers)
    finally:
        on.close()


def test_a_callback_that_raises_ends_only_its_own_request(
    engine_for: MakeEngine, one_at_a_time: OneAtATime
) -> None:
    engine = engine_for(parallel=3)
    broken = Record()

    def emit(piece: str) -> None:
        broken.emit(piece)
        if len(broken.pieces) == 4:
            raise BrokenPipeError("the client went away")

    broken.request = engine.submit(PROMPTS[0], GREEDY, emit=emit, done=broken.done)
    others = [submit(engine, p) for p in PROMPTS[1:3]]
    drain(engine)
    f = finished(broken)
    assert f.finish_reason == "cancelled" and "BrokenPipeError" in f.error
    assert f.tokens_generated == 4
    assert texts_of(others) == [one_at_a_time(p) for p in PROMPTS[1:3]]


def test_a_done_callback_that_raises_surfaces_from_step_and_the_others_go_on(
    engine_for: MakeEngine, one_at_a_time: OneAtATime
) -> None:
    engine = engine_for(parallel=2)

    def done(_: Finish) -> None:
        raise RuntimeError("the caller's bug")

    engine.submit(
        PROMPTS[0], GenerationParams(max_tokens=3, temperature=0.0), emit=lambda _: None, done=done
    )
    other = submit(engine, PROMPTS[1])
    with pytest.raises(RuntimeError, match="the caller's bug"):
        drain(engine)
    drain(engine)
    assert finished(other).text == one_at_a_time(PROMPTS[1])


def test_the_engine_names_the_models_special_tokens_and_chat_template(
    engine_for: MakeEngine,
) -> None:
    engine = engine_for(parallel=1)
    assert engine.special_texts() == ("<s>", "</s>")  # actors/gguf_synth.py's vocabulary
    assert engine.metadata("tokenizer.chat_template") == CHATML_TEMPLATE
    assert engine.metadata("no.such.key") is None


def random_adapter(path: Path, size: str, seed: int = 5) -> Path:
    """A rank-4 LoRA adapter on every attention query and output matrix of preset `size`."""
    shape, rank = SIZES[size], 4
    rng = np.random.default_rng(seed)
    tensors = {
        f"blk.{i}.{name}.weight": (
            rng.standard_normal((rank, shape.n_embd), dtype=np.float32) * 0.5,
            rng.standard_normal((shape.n_embd, rank), dtype=np.float32) * 0.5,
        )
        for i in range(shape.n_layer)
        for name in ("attn_q", "attn_output")
    }
    return write_lora_adapter(path, arch="llama", alpha=float(rank), tensors=tensors)


def test_a_lora_adapter_changes_the_output_to_what_llama_cpp_python_serves_with_it(
    small_gguf: Path, tmp_path: Path
) -> None:
    adapter = random_adapter(tmp_path / "adapter.gguf", "small")
    base = GgufEngine.load(spec(small_gguf), parallel=2, flash_attn=False)
    adapted = GgufEngine.load(
        replace(spec(small_gguf), lora_path=str(adapter)), parallel=2, flash_attn=False
    )
    try:
        assert adapted.version == base.version + "+" + adapted.version.split("+", 1)[1]
        assert adapted.version.split("+", 1)[1].startswith("adapter@")
        texts = {}
        for name, engine in (("base", base), ("adapted", adapted)):
            records = [submit(engine, p) for p in PROMPTS[:2]]
            drain(engine)
            texts[name] = [finished(r).text for r in records]
    finally:
        base.close()
        adapted.close()
    llm = llama_python(small_gguf, lora_path=str(adapter))
    try:
        expected = [completion_text(llm, p, GREEDY) for p in PROMPTS[:2]]
    finally:
        llm.close()
    assert texts["adapted"] == expected
    assert all(a != b for a, b in zip(texts["adapted"], texts["base"], strict=True))


def test_an_adapter_that_does_not_load_fails_the_load_with_llama_cpps_reason(
    small_gguf: Path, tiny_gguf: Path, tmp_path: Path
) -> None:
    wrong = random_adapter(tmp_path / "tiny-adapter.gguf", "tiny")  # shapes of another model
    with pytest.raises(BackendError, match="could not load the LoRA adapter"):
        GgufEngine.load(replace(spec(small_gguf), lora_path=str(wrong)), parallel=1)


@pytest.fixture(scope="module")
def untemplated_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small preset without tokenizer.chat_template."""
    return write_preset(
        tmp_path_factory.mktemp("untemplated") / "plain.gguf", "small", chat_template=False
    )


CHAT = (ChatMessage("system", "Be brief."), ChatMessage("user", "Hello there"))
CHATML_TEXT = (
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def test_a_model_without_a_chat_template_renders_chat_as_chatml_and_stops_at_its_end_tag(
    untemplated_gguf: Path,
) -> None:
    engine = GgufEngine.load(spec(untemplated_gguf), parallel=1)
    try:
        assert engine.metadata("tokenizer.chat_template") is None
        assert engine.chat_template == "chatml"
        tokens, stops = engine.chat_prompt(CHAT)
        assert tokens == engine.tokenize(CHATML_TEXT, add_bos=True)  # as llama-server: BOS first
        assert tokens[0] == 1
        assert engine.tokenize("<|im_start|>", add_bos=False) == [3]  # a control token, parsed
        assert "<|im_end|>" in stops
    finally:
        engine.close()


def test_a_model_with_a_chat_template_renders_chat_with_its_own(engine_for: MakeEngine) -> None:
    engine = engine_for(parallel=1)
    assert engine.chat_template == "model"
    tokens, _ = engine.chat_prompt(CHAT)
    # The synthetic template is ChatML, rendered as create_chat_completion renders a model's
    # template: no BOS unless the template writes one.
    assert tokens == engine.tokenize(CHATML_TEXT, add_bos=False)


def test_set_threads_changes_the_threads_llama_cpp_computes_with(engine_for: MakeEngine) -> None:
    engine = engine_for(parallel=1)
    engine.set_threads(3)
    assert engine._lib.llama_n_threads(engine._ctx) == 3
    assert engine._lib.llama_n_threads_batch(engine._ctx) == 3
    record = submit(engine, "Hello")
    drain(engine)
    assert finished(record).tokens_generated > 0
