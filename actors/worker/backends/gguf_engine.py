"""A continuous-batching GGUF engine: one model, one context, `parallel` sequences (slots).

It drives llama.cpp's low-level API (the `llama_cpp.llama_cpp` ctypes functions) the way
llama.cpp's own server drives its slots:

- `submit` queues a request (FIFO); each `step` first admits queued requests into free slots,
  then makes ONE `llama_decode` of ONE batch holding the next token of every generating
  sequence plus chunks of unfinished prompts (chunked prefill, at most `step_tokens` tokens per
  step, so a long prompt never stalls the running streams for more than one chunk), then samples
  each sequence that produced logits with its own sampler chain, streams its text, and frees the
  slot of a sequence that is done.
- Each slot remembers the tokens whose KV its sequence holds; a new request takes the free slot
  sharing the longest prefix with its prompt (when that is at least half of it), drops the rest
  of that sequence from the KV cache and decodes only its own remainder (llama.cpp server's
  `cache_prompt`); else it takes back the slot a one-off evicted its cache from, else an empty
  or the least recently used slot (`slots.choose_slot`). The KV cache is not unified: each sequence has its own stream of `n_ctx`
  cells, so a slot's prompt can never crowd out another's, and attention reads only its own.
- llama.cpp decodes such a batch in one pass only over consecutive sequences listed in order,
  so the batch lists them by slot, and a slot in a gap between the step's sequences takes a
  throwaway token (its last one again, after its cache) that is removed right after the decode.
- When a prompt finishes prefill its slot keeps the logits of its last position (n_vocab
  floats). A later request whose prompt is exactly that prompt again (agents repeat theirs)
  decodes nothing: its KV is trimmed to the prompt and its first token is sampled from the
  saved logits, as llama-cpp-python's `Llama.generate` did for an identical prompt.
- The slot choice and the step's batch plan are pure functions (slots.py).

This is the one GGUF serving path: one slot (`parallel` 1) serves requests one after another
with the same code. Sampling is `Llama.generate`'s chain (sampling.py): greedy at temperature 0,
else top-k, top-p, min-p, temperature, then a draw seeded per request. Text is streamed UTF-8
safe (an incremental decoder holds a character split across tokens) and held back while it may
be the start of a stop sequence (StopMatcher). Chat is rendered with the model's template, or
ChatML when the file has none (as llama.cpp's server does). A LoRA adapter (`spec.lora_path`)
is applied to the context at scale 1.0, as `Llama(lora_path=...)` does.

Not thread-safe: one thread (the worker's request loop) calls submit, cancel and step.
"""

from __future__ import annotations

import codecs
import concurrent.futures
import ctypes
import functools
import itertools
import os
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from actors.types import ChatMessage, FinishReason, GenerationParams, TokenLogprob
from actors.worker.backends import BackendError, BadRequest, Outcome, file_version
from actors.worker.backends.embedder import Embedder, pooling_of
from actors.worker.backends.gguf import (
    CHATML_STOP,
    CHATML_TEMPLATE,
    check_gguf_file,
    describe_buffers,
    llama_log,
    render_chat,
)
from actors.worker.backends.sampling import Candidates, request_samplers, sample, token_logprobs
from actors.worker.backends.slots import (
    Chunk,
    SlotView,
    Wants,
    choose_slot,
    gap_fillers,
    plan_step,
)
from actors.worker.backends.stops import StopMatcher
from actors.worker.protocol import LoadSpec

STEP_TOKENS = 256
"""Default tokens per step: a prompt chunk costs the running streams at most one such decode."""

_UTF8 = codecs.getincrementaldecoder("utf-8")
_CACHED_PROMPTS = 256  # completion prompts whose tokens are kept
_CACHED_PROMPT_CHARS = 4096  # longer prompts are tokenized each time (their decode dominates)
_ALL_GPU_LAYERS = 0x7FFFFFFF  # llama.cpp's "every layer" (what Llama() passes for -1)
_backend_ready = False


@dataclass(frozen=True, slots=True)
class Finish:
    """How a request ended, handed to its `done` callback once."""

    text: str  # everything emitted, in order
    tokens_generated: int
    prompt_tokens: int
    prompt_tokens_reused: int  # prompt tokens whose KV a slot already held (not decoded again)
    finish_reason: FinishReason
    error: str = ""  # set when llama.cpp failed the decode (finish_reason is then "cancelled")
    logprobs: tuple[TokenLogprob, ...] | None = None  # each token's, when the request asked
    first_token_ms: float | None = None  # from submit to its first sampled token; None: none

    def outcome(self) -> Outcome:
        """Return the backend-neutral outcome the worker answers with."""
        return Outcome(self.text, self.tokens_generated, self.prompt_tokens, self.finish_reason)


Emit = Callable[[str], None]
Done = Callable[[Finish], None]


class Request:
    """One submitted request: the handle `cancel` takes. Made by `GgufEngine.submit` only."""

    def __init__(
        self,
        prompt: list[int],
        n_prompt: int,
        budget: int,
        params: GenerationParams,
        stop: tuple[str, ...],
        emit: Emit,
        done: Done,
    ) -> None:
        self.prompt = prompt  # the tokens to decode (a lone BOS for an empty prompt)
        self.n_prompt = n_prompt  # prompt tokens as reported (0 for an empty prompt, as before)
        self.budget = budget  # tokens it may generate: max_tokens, bounded by the context
        self.params = params
        self.emit = emit
        self.done = done
        self.matcher = StopMatcher(stop)
        self.decoder = _UTF8(errors="ignore")
        self.out: list[str] = []
        self.sampler: Any = None  # its chain, from submit until it ends
        self.grammar: Any = None  # its json_schema's grammar sampler, kept apart from the chain
        # Set at admission:
        self.slot: _Slot | None = None
        self.reused = 0
        self.next_prompt = 0  # index of the next prompt token to decode
        self.pending: int | None = None  # sampled, to be decoded by the next step
        self.from_saved = False  # its whole prompt was cached: sample from the slot's logits
        self.produced = 0
        self.submitted_at = time.monotonic()
        self.first_token_ms: float | None = None
        self.logprobs: list[TokenLogprob] = []  # filled when params.logprobs is not None

    @property
    def running(self) -> bool:
        """True while it holds a slot."""
        return self.slot is not None


@dataclass(slots=True)
class _Slot:
    index: int  # also its llama.cpp sequence id
    cached: list[int]  # the tokens whose KV the sequence holds: positions 0..len-1
    last_used: int = 0
    came_back: bool = False  # a request came back for the prompt it holds (see SlotView)
    evicted: tuple[int, ...] = ()  # the cache that prompt evicted from it
    request: Request | None = None
    # The logits after cached[:logits_at] (the last prompt that finished prefill here), or 0.
    logits_at: int = 0
    logits: np.ndarray | None = None

    def forget_logits_past(self, n: int) -> None:
        """Drop the saved logits when the KV they follow is cut below them."""
        if self.logits_at > n:
            self.logits_at, self.logits = 0, None

    def emptied(self) -> None:
        """Forget everything of the sequence, whose KV was just removed whole."""
        self.cached.clear()
        self.forget_logits_past(0)
        self.came_back, self.evicted = False, ()


class GgufEngine:
    """Serve many requests on one GGUF model at once, one batched decode per `step`."""

    def __init__(
        self,
        lib: Any,
        model: Any,
        ctx: Any,
        *,
        parallel: int,
        n_ctx: int,
        step_tokens: int,
        seed: int,
        version: str,
        adapter: Any = None,
    ) -> None:
        self._lib = lib
        self._model = model
        self._ctx = ctx
        self._adapter = adapter  # the LoRA adapter set on the context, freed at close
        self._vocab = lib.llama_model_get_vocab(model)
        self._n_vocab = int(lib.llama_vocab_n_tokens(self._vocab))
        self._mem = lib.llama_get_memory(ctx)
        self._batch = lib.llama_batch_init(step_tokens, 0, 1)
        self._n_ctx = n_ctx
        self._step_tokens = step_tokens
        self._seed = seed
        self._version = version
        self._slots = [_Slot(i, []) for i in range(parallel)]
        # A recurrent state cannot take a token back: its slots are never fillers.
        self._fillable = not (
            lib.llama_model_is_recurrent(model) or lib.llama_model_is_hybrid(model)
        )
        self._queue: deque[Request] = deque()
        self._running: list[Request] = []  # in admission order: prompts are served oldest first
        self._tick = itertools.count(1)
        self._pieces: dict[int, bytes] = {}
        self._closed = False
        template = _meta(lib, model, "tokenizer.chat_template")
        self._template = template or CHATML_TEMPLATE
        self._chat_template = "model" if template else "chatml"
        # To sample saved logits, and a grammar's requests: one buffer (one thread uses it).
        self._candidates = Candidates(lib, self._n_vocab)
        self._prompts: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self.weight_buffers: dict[str, float] = {}  # MiB of weights per llama.cpp buffer type
        # Work beside the decode (see step's `during`): a thread that runs it, an eventfd that
        # says the decode is done, the slots the decode holds, KV trims that wait for its end.
        self._beside: concurrent.futures.ThreadPoolExecutor | None = None
        self._decoded_fd = -1
        self._in_decode: set[int] | None = None
        self._trims: list[tuple[int, int]] = []
        self._raised_beside: list[Exception] = []
        self.decoded_tokens = 0  # tokens decoded so far, prompt and generated (for tests)
        self.filler_tokens = 0  # throwaway tokens that joined a step's sequences (for tests)

    @classmethod
    def load(
        cls,
        spec: LoadSpec,
        *,
        parallel: int = 1,
        step_tokens: int = STEP_TOKENS,
        n_threads_batch: int = 0,
        flash_attn: bool | None = None,
    ) -> GgufEngine:
        """Load `spec` with `parallel` slots of `spec.n_ctx` tokens each.

        `step_tokens` bounds the tokens decoded per step (llama.cpp's n_batch); it is at least
        `parallel`, so every generating sequence gets its token each step. `spec.n_threads` and
        `n_threads_batch` (prompt chunks; 0: as n_threads) of 0 leave llama.cpp's default.
        `flash_attn` None lets llama.cpp decide, as llama-server does (on where the device has
        the kernels, the CPU included: 8 streams on the ~50M model, 2 threads, 448 tokens/s
        against 344 with it off); False is llama-cpp-python's default, whose greedy text the
        engine then equals byte for byte.
        Raise BackendError with llama.cpp's reason.
        """
        if parallel < 1:
            raise BackendError(f"parallel must be at least 1, not {parallel}")
        if step_tokens < parallel:
            raise BackendError(
                f"step_tokens ({step_tokens}) must be at least parallel ({parallel})"
            )
        check_gguf_file(spec.path)
        try:
            import llama_cpp
        except ImportError as exc:  # pragma: no cover - a dependency of the package
            raise BackendError(f"llama-cpp-python is not installed: {exc}") from exc
        lib = llama_cpp.llama_cpp
        log = llama_log(llama_cpp)
        global _backend_ready
        if not _backend_ready:
            lib.llama_backend_init()
            _backend_ready = True
        mparams = lib.llama_model_default_params()
        if hasattr(mparams, "use_extra_bufts"):  # off keeps the AMX matmul away (see gguf.py)
            mparams.use_extra_bufts = spec.cpu_repack
        elif not spec.cpu_repack:
            raise BackendError(
                f"llama-cpp-python {llama_cpp.__version__} cannot turn off llama.cpp's CPU weight "
                "repacking (llama_model_params has no use_extra_bufts), which crashes on CPUs "
                "with AMX: upgrade llama-cpp-python, or set cpu_repack = true to load anyway"
            )
        if spec.on_gpu:
            layers = spec.gpu_layers
            mparams.n_gpu_layers = _ALL_GPU_LAYERS if layers < 0 else layers
            if spec.device_index is not None:
                mparams.main_gpu = spec.device_index
        else:
            mparams.n_gpu_layers = 0
        # Read CPU weights into memory (an honest RSS, see gguf.py); map them on a GPU.
        mparams.load_mode = lib.LLAMA_LOAD_MODE_MMAP if spec.on_gpu else lib.LLAMA_LOAD_MODE_NONE
        model = lib.llama_model_load_from_file(spec.path.encode(), mparams)
        if not model:
            detail = log.errors()
            raise BackendError(
                f"llama.cpp could not load {spec.path}" + (f" ({detail})" if detail else "")
            )
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = spec.n_ctx * parallel
        cparams.n_seq_max = parallel
        cparams.kv_unified = False  # a stream of n_ctx cells per slot
        cparams.n_batch = step_tokens
        cparams.n_ubatch = min(step_tokens, 512)
        cparams.flash_attn_type = {
            None: lib.LLAMA_FLASH_ATTN_TYPE_AUTO,
            True: lib.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            False: lib.LLAMA_FLASH_ATTN_TYPE_DISABLED,
        }[flash_attn]
        cparams.no_perf = True
        if spec.n_threads > 0:
            cparams.n_threads = spec.n_threads
            cparams.n_threads_batch = n_threads_batch or spec.n_threads
        elif n_threads_batch > 0:
            cparams.n_threads_batch = n_threads_batch
        ctx = lib.llama_init_from_model(model, cparams)
        if not ctx:
            detail = log.errors()
            lib.llama_model_free(model)
            raise BackendError(
                f"llama.cpp could not make a context of {parallel} x {spec.n_ctx} tokens for "
                f"{spec.path}" + (f" ({detail})" if detail else "")
            )
        if lib.llama_n_ctx_seq(ctx) < spec.n_ctx:  # llama.cpp rounds up, never down: a guard
            lib.llama_free(ctx)
            lib.llama_model_free(model)
            raise BackendError(f"llama.cpp gave each sequence fewer than {spec.n_ctx} cells")
        adapter = None
        if spec.lora_path:
            try:
                adapter = _set_lora(lib, model, ctx, spec.lora_path, log.errors)
            except BackendError:
                lib.llama_free(ctx)
                lib.llama_model_free(model)
                raise
        name = _meta(lib, model, "general.name") or Path(spec.path).stem
        version = file_version(spec.path, name)
        if spec.lora_path:  # the adapter is part of what is served: a new one is a new version
            version += "+" + file_version(spec.lora_path, Path(spec.lora_path).stem)
        engine = cls(
            lib,
            model,
            ctx,
            parallel=parallel,
            n_ctx=spec.n_ctx,
            step_tokens=step_tokens,
            seed=spec.seed,
            version=version,
            adapter=adapter,
        )
        engine.weight_buffers = dict(log.weights)
        lora = f", LoRA {spec.lora_path}" if spec.lora_path else ""
        chat = {
            "model": "the model's own",
            "chatml": "ChatML (the model has no tokenizer.chat_template)",
        }[engine.chat_template]
        print(
            f"moc gguf: loaded {spec.path}: weights in {describe_buffers(engine.weight_buffers)}"
            f" (cpu_repack {'on' if spec.cpu_repack else 'off'}, {parallel} slots of "
            f"{spec.n_ctx} tokens{lora}); chat template: {chat}",
            file=sys.stderr,
            flush=True,
        )
        return engine

    # --- what the worker reads ---

    @property
    def version(self) -> str:
        """Identify the weights."""
        return self._version

    @property
    def n_ctx(self) -> int:
        """Return the context of one slot in tokens (what one request may use)."""
        return self._n_ctx

    @property
    def chat_template(self) -> str:
        """Name the template chat is rendered with: "model" (the GGUF's own) or "chatml"."""
        return self._chat_template

    @property
    def parallel(self) -> int:
        """Return the number of slots."""
        return len(self._slots)

    @property
    def slots_busy(self) -> int:
        """Return how many slots hold a request."""
        return len(self._running)

    @property
    def queue_depth(self) -> int:
        """Return how many submitted requests wait for a slot."""
        return len(self._queue)

    def has_work(self) -> bool:
        """Return True while a request is queued or running: the caller should `step`."""
        return bool(self._queue or self._running)

    def metadata(self, key: str) -> str | None:
        """Return a GGUF metadata value as text (the chat template, say), or None."""
        return _meta(self._lib, self._model, key)

    def special_texts(self) -> tuple[str, str]:
        """Return the texts of the BOS and EOS tokens ("" where the model has none): what a chat
        template's bos_token and eos_token name."""
        lib, vocab = self._lib, self._vocab

        def text(token: int) -> str:
            if token == -1:
                return ""
            raw: bytes = lib.llama_vocab_get_text(vocab, token)
            return raw.decode("utf-8", errors="replace")

        return text(lib.llama_vocab_bos(vocab)), text(lib.llama_vocab_eos(vocab))

    def embedder(self) -> Embedder:
        """Return a new embeddings context on this engine's weights, pooled as the model says
        (actors/worker/backends/embedder.py); the caller closes it before the engine."""
        arch = self.metadata("general.architecture") or ""
        pooling = pooling_of(self.metadata(f"{arch}.pooling_type"))
        n_threads = self._lib.llama_n_threads(self._ctx)
        return Embedder(self._lib, self._model, self._n_ctx, n_threads, pooling)

    def slot_tokens(self, index: int) -> tuple[int, ...]:
        """Return the tokens whose KV slot `index` holds (for tests and metrics)."""
        return tuple(self._slots[index].cached)

    def chat_prompt(self, messages: Sequence[ChatMessage]) -> tuple[list[int], tuple[str, ...]]:
        """Render `messages` with the chat template; return its tokens and its stops.

        Raise BadRequest on "messages" when the template fails.
        """
        bos_text, eos_text = self.special_texts()
        chat = render_chat(self._template, bos_text=bos_text, eos_text=eos_text, messages=messages)
        if self._chat_template == "model":  # as create_chat_completion tokenizes it
            return self.tokenize(chat.text, add_bos=chat.add_bos, special=True), chat.stops
        # As llama.cpp's server tokenizes its ChatML: a BOS where the model wants one, and a
        # stop at <|im_end|> where that is plain text rather than an end-of-turn token.
        stops = chat.stops if CHATML_STOP in chat.stops else (*chat.stops, CHATML_STOP)
        return self.tokenize(chat.text, add_bos=True, special=True), stops

    # --- tokens ---

    def tokenize(self, text: str, *, add_bos: bool, special: bool = True) -> list[int]:
        """Tokenize `text` (special tokens parsed when `special`), a BOS first when `add_bos`."""
        data = text.encode("utf-8")
        size = len(data) + 2
        while True:
            buf = (ctypes.c_int32 * size)()
            n = self._lib.llama_tokenize(self._vocab, data, len(data), buf, size, add_bos, special)
            if n >= 0:
                return list(buf[:n])
            size = -n

    def prompt_tokens(self, prompt: str) -> list[int]:
        """Tokenize a completion prompt as create_completion does (BOS when the model wants it).

        Recent short prompts keep their tokens: agents repeat theirs, and tokenizing is a pure
        function of the text.
        """
        cached = self._prompts.get(prompt)
        if cached is not None:
            self._prompts.move_to_end(prompt)
            return list(cached)
        lib, vocab = self._lib, self._vocab
        bos = lib.llama_vocab_bos(vocab)
        head = [bos] if lib.llama_vocab_get_add_bos(vocab) and bos != -1 else []
        tokens = head + (self.tokenize(prompt, add_bos=False) if prompt else [])
        if len(prompt) <= _CACHED_PROMPT_CHARS:
            self._prompts[prompt] = tuple(tokens)
            if len(self._prompts) > _CACHED_PROMPTS:
                self._prompts.popitem(last=False)
        return tokens

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            size = 64
            while True:
                buf = ctypes.create_string_buffer(size)
                n = self._lib.llama_token_to_piece(self._vocab, token, buf, size, 0, False)
                if n >= 0:
                    piece = buf.raw[:n]
                    break
                size = -n
            self._pieces[token] = piece  # at most one entry per vocabulary token
        return piece

    # --- requests ---

    def submit(
        self,
        prompt: str | Sequence[int],
        params: GenerationParams,
        *,
        emit: Emit,
        done: Done,
        extra_stops: tuple[str, ...] = (),
        field: str = "prompt",
    ) -> Request:
        """Queue a request: text (tokenized with the BOS rule) or tokens; return its handle.

        `emit` gets each piece of text the moment it is safe; `done` gets the Finish once, from
        a later `step` or `cancel` (at once when there is nothing to generate). Generation ends
        at `params.stop` or `extra_stops` (a chat template's). Raise BadRequest naming `field`
        when the prompt does not fit one slot's context, or naming the parameter the sampler
        chain refuses.
        """
        if self._closed:
            raise BackendError("the engine is closed")
        tokens = self.prompt_tokens(prompt) if isinstance(prompt, str) else list(prompt)
        if len(tokens) >= self._n_ctx:
            raise BadRequest(
                field, f"prompt is {len(tokens)} tokens; the context holds {self._n_ctx}"
            )
        if tokens and (min(tokens) < 0 or max(tokens) >= self._n_vocab):
            raise BadRequest(field, f"a token id is outside the vocabulary of {self._n_vocab}")
        n_prompt = len(tokens)
        budget = min(params.max_tokens, self._n_ctx - n_prompt)
        if not tokens:
            # An empty prompt on a model without BOS: llama.cpp needs one token to start from.
            tokens = [self._lib.llama_vocab_bos(self._vocab)]
        request = Request(tokens, n_prompt, budget, params, params.stop + extra_stops, emit, done)
        if budget <= 0:
            done(Finish("", 0, n_prompt, 0, "length"))
            return request
        # Built now, so that parameters llama.cpp refuses (a grammar, a bias) fail this call.
        request.sampler, request.grammar = request_samplers(
            self._lib, self._vocab, params, self._seed
        )
        self._queue.append(request)
        return request

    def cancel(self, request: Request) -> bool:
        """Stop `request` now (queued or running); False if it already finished."""
        if request.running:
            self._finish(request, "cancelled")
            return True
        try:
            self._queue.remove(request)
        except ValueError:
            return False
        self._free_sampler(request)
        request.done(Finish("", 0, request.n_prompt, 0, "cancelled"))
        return True

    # --- the step ---

    def step(
        self,
        flush: Callable[[], None] | None = None,
        during: Callable[[int], None] | None = None,
    ) -> int:
        """Admit what fits, decode one batch, sample and stream; return the tokens decoded.

        A request whose whole prompt was cached gets its first token from the saved logits
        before the decode, and its next in this very decode; `flush` is called after those
        first tokens are emitted, so that they can leave before the decode runs.

        With `during`, `during(fd)` runs on a thread of the engine's while this one decodes
        (unless the batch is one token and no request was just admitted), and must return once
        `fd` is readable (the decode is done). It may call `submit` and
        `admit_cached`, and nothing else of the engine. (The decode stays on the caller's
        thread: a crash in it is then the main thread's, whose stack the crash report shows.)
        """
        self._apply_trims()
        arrived = self._admit()
        raised = self._first_from_saved()
        if raised is not None and flush is not None:
            flush()
        if not self._running:
            if raised:
                raise raised[0]
            return 0
        wants = [
            Wants(r.slot.index, r.pending is not None, len(r.prompt) - r.next_prompt)
            for r in self._running
            if r.slot is not None
        ]
        plan = plan_step(wants, self._step_tokens)
        fillers = self._fillers(plan)
        batch, lib = self._batch, self._lib
        n = 0
        outputs: list[tuple[Request, int]] = []  # (request, batch index of its logits)
        decoded: list[tuple[Request, list[int]]] = []
        for chunk in sorted([*plan, *(Chunk(seq, 0) for seq in fillers)], key=lambda c: c.seq):
            slot = self._slots[chunk.seq]
            if chunk.n_tokens == 0:  # a filler: its slot's last token again, after its cache
                batch.token[n] = slot.cached[-1] if slot.cached else 0
                batch.pos[n] = len(slot.cached)
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = slot.index
                batch.logits[n] = False
                n += 1
                continue
            request = slot.request
            assert request is not None
            if request.pending is not None:
                tokens = [request.pending]
            else:
                tokens = request.prompt[request.next_prompt : request.next_prompt + chunk.n_tokens]
            last_prompt = request.next_prompt + len(tokens) >= len(request.prompt)
            pos = len(slot.cached)
            for k, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = pos + k
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = slot.index
                output = k == len(tokens) - 1 and (request.pending is not None or last_prompt)
                batch.logits[n] = output
                if output:
                    outputs.append((request, n))
                n += 1
            decoded.append((request, tokens))
        if n:
            batch.n_tokens = n
            # A step of one token is the shortest decode: what arrives during it waits less
            # than a token's time, while the thread's two hand-offs would cost every such step
            # ~2% (medium50m on 2 cores: 6.35 -> 6.50 ms a token). Requests come in bursts,
            # though: after an admission the thread stays, so the rest of a burst whose prompts
            # are cached gets its first tokens during the decode, not after it.
            if during is None or not self._fillable or (n == 1 and not arrived):
                rc = lib.llama_decode(self._ctx, batch)
            else:
                rc = self._decode_beside(during, {c.seq for c in plan})
            raised = (raised or []) + self._raised_beside
            self._raised_beside = []
            self._drop_fillers(fillers)
            if rc != 0:
                self._fail([r for r, _ in decoded], f"llama_decode returned {rc}")
                if raised:
                    raise raised[0]
                return 0
            n -= len(fillers)
            self.decoded_tokens += n
            self.filler_tokens += len(fillers)
        for request, tokens in decoded:
            assert request.slot is not None
            request.slot.cached.extend(tokens)
            if request.pending is not None:
                request.pending = None
            else:
                request.next_prompt += len(tokens)
                if request.next_prompt == len(request.prompt):
                    self._save_logits(request.slot, request, outputs)
        raised = raised or []
        for request, index in outputs:
            if not request.running:  # cancelled by an earlier request's callback
                continue
            try:
                if request.grammar is None:
                    token = lib.llama_sampler_sample(request.sampler, self._ctx, index)
                else:
                    logits = self._logits(index)
                    token = sample(lib, request.sampler, request.grammar, self._candidates, logits)
                self._take(request, token, functools.partial(self._logits, index))
            except Exception as exc:  # a `done` callback's: the others still get their token
                raised.append(exc)
        if raised:
            raise raised[0]
        return n

    def _first_from_saved(self) -> list[Exception] | None:
        """Sample the first token of each request admitted onto its whole prompt's saved logits;
        return the errors its callbacks raised, or None when there was no such request."""
        saved = [r for r in self._running if r.from_saved]
        if not saved:
            return None
        raised: list[Exception] = []
        for request in saved:
            if not request.running:  # cancelled by an earlier request's callback
                continue
            request.from_saved = False
            try:
                row = functools.partial(self._saved_logits, request)
                self._take(request, self._sample_saved(request), row)
            except Exception as exc:  # a callback's: the others still get their token
                raised.append(exc)
        return raised

    def admit_cached(self) -> bool:
        """While a decode runs beside (see `step`), admit queued requests whose whole prompt a
        slot outside the decode holds with its logits, oldest first, and give them their first
        token now; return True if any was admitted. The others wait for the next step.

        A gap filler of the decode counts as outside it: its throwaway token lies past the
        prompt, and is cut after the decode with the rest the prompt does not share.
        """
        if self._in_decode is None or not self._admit(beside=self._in_decode):
            return False
        self._raised_beside += self._first_from_saved() or []
        return True

    def _decode_beside(self, during: Callable[[int], None], slots: set[int]) -> int:
        """Decode this step's batch here while `during` runs on the engine's other thread."""
        if self._beside is None:
            self._decoded_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._beside = concurrent.futures.ThreadPoolExecutor(1, "beside-decode")
        self._in_decode = slots
        beside = self._beside.submit(during, self._decoded_fd)
        try:
            return int(self._lib.llama_decode(self._ctx, self._batch))
        finally:
            os.eventfd_write(self._decoded_fd, 1)
            try:
                beside.result()  # nothing goes on while `during` still runs
            except Exception as exc:  # the step's bookkeeping must still follow its decode
                self._raised_beside.append(exc)
            finally:
                os.eventfd_read(self._decoded_fd)
                self._in_decode = None

    def _apply_trims(self) -> None:
        """Cut the KV that slots admitted beside the last decode no longer share."""
        for index, keep in self._trims:
            self._lib.llama_memory_seq_rm(self._mem, index, keep, -1)  # never fails: _fillable
        self._trims.clear()

    def _fillers(self, plan: list[Chunk]) -> list[int]:
        """The slots outside `plan` that take a throwaway token so that it decodes in one pass."""
        if not self._fillable:
            return []
        planned = {c.seq for c in plan}
        open_ = {
            s.index for s in self._slots if s.index not in planned and len(s.cached) < self._n_ctx
        }
        spare = self._step_tokens - sum(c.n_tokens for c in plan)
        return gap_fillers(planned, open_, spare)

    def _drop_fillers(self, fillers: list[int]) -> None:
        """Remove the fillers' tokens: each slot's cache is again exactly its `cached`."""
        for index in fillers:
            slot = self._slots[index]
            if not self._lib.llama_memory_seq_rm(self._mem, index, len(slot.cached), -1):
                self._lib.llama_memory_seq_rm(self._mem, index, -1, -1)  # never left unsure
                slot.emptied()

    def _save_logits(
        self, slot: _Slot, request: Request, outputs: list[tuple[Request, int]]
    ) -> None:
        """Keep the logits of the prompt's last position for the same prompt again."""
        index = next(i for r, i in outputs if r is request)
        logits = self._lib.llama_get_logits_ith(self._ctx, index)
        slot.logits = np.ctypeslib.as_array(logits, shape=(self._n_vocab,)).copy()
        slot.logits_at = len(request.prompt)

    def _sample_saved(self, request: Request) -> int:
        """Sample from the slot's saved logits as llama_sampler_sample samples a decode's."""
        slot = request.slot
        assert slot is not None and slot.logits is not None
        return sample(self._lib, request.sampler, request.grammar, self._candidates, slot.logits)

    def _admit(self, beside: Collection[int] | None = None) -> bool:
        """Give queued requests free slots, oldest first, each the slot with its longest prefix;
        return True if any was admitted.

        `beside`: a decode holding these slots runs; only a request whose whole prompt is cached
        with its logits is admitted (the queue waits behind any other), and the KV it does not
        share is cut when the decode is over (`_apply_trims`).
        """
        admitted = False
        while self._queue:
            free = [
                SlotView(s.index, s.cached, s.last_used, s.logits_at, s.came_back, s.evicted)
                for s in self._slots
                if s.request is None and (beside is None or s.index not in beside)
            ]
            request = self._queue[0]
            choice = choose_slot(request.prompt, free)
            if choice is None or (beside is not None and choice.reused < len(request.prompt)):
                return admitted
            self._queue.popleft()
            admitted = True
            slot = self._slots[choice.index]
            if choice.came_back:
                slot.came_back, slot.evicted = True, ()
            else:
                slot.came_back, slot.evicted = False, tuple(slot.cached)
            reused = choice.reused
            # Drop what the new prompt does not share; a cache that cannot cut a sequence in the
            # middle (recurrent models) drops the whole sequence.
            if beside is not None:
                self._trims.append((slot.index, reused))
            elif not self._lib.llama_memory_seq_rm(self._mem, slot.index, reused, -1):
                self._lib.llama_memory_seq_rm(self._mem, slot.index, -1, -1)
                reused = 0
            del slot.cached[reused:]
            slot.forget_logits_past(reused)
            slot.last_used = next(self._tick)
            slot.request = request
            request.slot = slot
            request.reused = request.next_prompt = reused
            request.from_saved = reused == len(request.prompt)
            self._running.append(request)
        return admitted

    def _logits(self, index: int) -> np.ndarray[Any, Any]:
        """Return the last decode's logits at batch position `index` (a view, not a copy)."""
        row = self._lib.llama_get_logits_ith(self._ctx, index)
        return np.ctypeslib.as_array(row, shape=(self._n_vocab,))

    @staticmethod
    def _saved_logits(request: Request) -> Any:
        """Return the saved logits a request whose prompt was cached was sampled from."""
        return request.slot.logits if request.slot is not None else None

    def _take(self, request: Request, token: int, logits: Callable[[], Any] | None = None) -> None:
        """Act on a sampled token: stream it, or end the request. `logits` gives the row it was
        drawn from, read only when the request asked for log probabilities."""
        if request.first_token_ms is None:
            request.first_token_ms = (time.monotonic() - request.submitted_at) * 1000.0
        if self._lib.llama_vocab_is_eog(self._vocab, token):
            self._finish(request, "stop")
            return
        top_n = request.params.logprobs
        if top_n is not None and logits is not None and (row := logits()) is not None:
            logprob, top = token_logprobs(row, token, top_n)
            alternatives = tuple((self._piece(t), lp) for t, lp in top)
            request.logprobs.append((self._piece(token), logprob, alternatives))
        request.produced += 1
        piece = request.decoder.decode(self._piece(token))
        safe = request.matcher.feed(piece) if piece else ""
        if safe:
            error = self._emit(request, safe)
            if not request.running:  # its own callback cancelled it
                return
            if error:
                self._finish(request, "cancelled", error)
                return
        if request.matcher.stopped:
            self._finish(request, "stop")
        elif request.produced >= request.budget:
            self._finish(request, "length")
        else:
            request.pending = token

    def _finish(self, request: Request, reason: FinishReason, error: str = "") -> None:
        """Free the request's slot (its KV stays for prefix reuse) and report it done."""
        self._release(request)
        if reason != "cancelled" and not request.matcher.stopped:
            tail = request.matcher.feed(request.decoder.decode(b"", final=True))
            tail += request.matcher.flush()
            if tail:
                error = self._emit(request, tail) or error
        request.done(
            Finish(
                "".join(request.out),
                request.produced,
                request.n_prompt,
                request.reused,
                reason,
                error,
                None if request.params.logprobs is None else tuple(request.logprobs),
                request.first_token_ms,
            )
        )

    @staticmethod
    def _emit(request: Request, text: str) -> str:
        """Stream `text`; return "" or what the callback raised (the request then ends)."""
        request.out.append(text)
        try:
            request.emit(text)
        except Exception as exc:
            return f"emit failed: {type(exc).__name__}: {exc}"
        return ""

    def _release(self, request: Request) -> None:
        slot = request.slot
        assert slot is not None
        slot.request = None
        request.slot = None
        request.pending = None
        self._running.remove(request)
        self._free_sampler(request)

    def _free_sampler(self, request: Request) -> None:
        if request.sampler is not None:
            self._lib.llama_sampler_free(request.sampler)
            request.sampler = None
        if request.grammar is not None:
            self._lib.llama_sampler_free(request.grammar)
            request.grammar = None

    def _fail(self, requests: list[Request], error: str) -> None:
        """End `requests` after a failed decode; their sequences are dropped whole."""
        for request in requests:
            slot = request.slot
            assert slot is not None
            self._lib.llama_memory_seq_rm(self._mem, slot.index, -1, -1)
            slot.emptied()
            self._finish(request, "cancelled", error)

    def set_threads(self, n_threads: int) -> None:
        """Decode (and prefill) with `n_threads` from the next step on."""
        self._lib.llama_set_n_threads(self._ctx, n_threads, n_threads)

    def close(self) -> None:
        """Cancel what is left and free the sampler chains, the batch, the context, the model."""
        if self._closed:
            return
        for request in list(self._running):
            self._finish(request, "cancelled")
        while self._queue:
            self.cancel(self._queue[0])
        self._closed = True
        if self._beside is not None:
            self._beside.shutdown()
            os.close(self._decoded_fd)
        lib = self._lib
        lib.llama_batch_free(self._batch)
        lib.llama_free(self._ctx)
        if self._adapter is not None:
            lib.llama_adapter_lora_free(self._adapter)
        lib.llama_model_free(self._model)


def _set_lora(lib: Any, model: Any, ctx: Any, path: str, errors: Callable[[], str]) -> Any:
    """Load the LoRA adapter at `path` and set it on `ctx` at scale 1.0; return it."""
    adapter = lib.llama_adapter_lora_init(model, path.encode())
    if not adapter:
        detail = errors()
        raise BackendError(
            f"llama.cpp could not load the LoRA adapter {path}" + (f" ({detail})" if detail else "")
        )
    adapters = (lib.llama_adapter_lora_p_ctypes * 1)(adapter)
    scales = (ctypes.c_float * 1)(1.0)
    if lib.llama_set_adapters_lora(ctx, adapters, 1, scales) != 0:
        lib.llama_adapter_lora_free(adapter)
        raise BackendError(f"llama.cpp could not apply the LoRA adapter {path}")
    return adapter


def _meta(lib: Any, model: Any, key: str) -> str | None:
    """Return the model's GGUF metadata value for `key` as text, or None."""
    size = 256
    while True:
        buf = ctypes.create_string_buffer(size)
        n = lib.llama_model_meta_val_str(model, key.encode(), buf, size)
        if n < 0:
            return None
        if n < size:
            return buf.value.decode("utf-8", errors="replace")
        size = n + 1
