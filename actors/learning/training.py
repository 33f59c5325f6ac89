"""Run one learning job to its end in the calling thread: load, train, checkpoint, export.

It runs in the job's own process (`job_process`), never in the node's.

The runner reads and writes only its own job's row. It checks `cancel` (the client cancelled)
and `stop` (the node shuts down: the job stays queued and resumes) before every step and
between phases, so both take effect within one training step.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from actors.learning.config import LearningConfig
from actors.learning.datasets import load_dataset
from actors.learning.gguf_io import read_gguf
from actors.learning.jobs import JobRecord, JobStore
from actors.learning.llama_torch import LlamaTorch
from actors.learning.spec import TrainParams
from actors.learning.tokenizer import Tokenizer
from actors.learning.trainers import Trainer, build_examples, make_trainer

_PROGRESS_EVERY_S = 0.25  # how often progress rows are written between checkpoints

TrainingEnding = Literal["completed", "cancelled", "stopped"]


class Interrupted(Exception):
    """The job was cancelled or the node is stopping."""


@dataclass(frozen=True, slots=True)
class JobResult:
    """How a run ended; `output_path` is set when it completed."""

    ending: TrainingEnding
    output_path: Path | None = None
    lora_base: str | None = None


@dataclass
class JobContext:
    """What a job run needs: its row, the store, the model files, and the stop flags."""

    job: JobRecord
    config: LearningConfig
    store: JobStore
    resolve_model: Callable[[str], Path]
    cancel: threading.Event
    stop: threading.Event
    on_progress: Callable[[dict[str, Any]], None] | None = None
    clock: Callable[[], float] = time.time


def checkpoint_dir(config: LearningConfig, job_id: str) -> Path:
    """Return the directory holding a job's checkpoints."""
    return Path(config.output_dir) / "checkpoints" / job_id


def output_path(config: LearningConfig, output_name: str) -> Path:
    """Return where a job writes its result."""
    safe = output_name.replace("/", "_")
    return Path(config.output_dir) / f"{safe}.gguf"


def _params(job: JobRecord) -> TrainParams:
    return TrainParams(**job.spec["training_params"])


def build(ctx: JobContext) -> tuple[Trainer, Path]:
    """Validate the data, load model (and teacher), tokenize; return the trainer and base path."""
    job = ctx.job
    tp = _params(job)
    dataset = load_dataset(job.dataset_path, job.job_type, ctx.config.dataset_dirs)
    base = ctx.resolve_model(job.model_name)
    tok = Tokenizer(base)
    try:
        items = build_examples(dataset, tok, tp.seq_len)
    finally:
        tok.close()
    _check(ctx)
    model = LlamaTorch.from_weights(read_gguf(base))
    teacher = None
    if tp.teacher is not None:
        teacher = LlamaTorch.from_weights(read_gguf(ctx.resolve_model(tp.teacher)))
    _check(ctx)
    return make_trainer(job.job_type, model, tp, items, teacher), base


def _check(ctx: JobContext) -> None:
    if ctx.cancel.is_set() or ctx.stop.is_set():
        raise Interrupted


def _save_checkpoint(ctx: JobContext, trainer: Trainer, step: int) -> str:
    folder = checkpoint_dir(ctx.config, ctx.job.id)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step}.pt"
    tmp = folder / f".step-{step}.pt.partial"
    torch.save({"step": step, **trainer.checkpoint()}, tmp)
    os.replace(tmp, path)  # a kill mid-write leaves the previous checkpoint intact
    for old in folder.glob("step-*.pt"):
        if old != path:
            old.unlink(missing_ok=True)
    return str(path)


def _restore(ctx: JobContext, trainer: Trainer) -> int:
    job = ctx.job
    if not job.checkpoint_step or not job.checkpoint_path or not Path(job.checkpoint_path).exists():
        ctx.store.rewind(job.id, 0)
        return 0
    # weights_only: a checkpoint holds tensors and numbers, never code to unpickle.
    state = torch.load(job.checkpoint_path, weights_only=True)
    trainer.restore(state)
    ctx.store.rewind(job.id, int(state["step"]))
    return int(state["step"])


def _notify(ctx: JobContext, **event: Any) -> None:
    if ctx.on_progress is not None:
        ctx.on_progress({"job_id": ctx.job.id, **event})


def run_job(ctx: JobContext) -> JobResult:
    """Run the job; return how it ended, or raise the error that failed it."""
    job, store = ctx.job, ctx.store
    try:
        _check(ctx)
        store.set_detail(job.id, "loading model and dataset", ctx.clock())
        trainer, base = build(ctx)
        start = _restore(ctx, trainer)
        metrics = dict(job.metrics)
        if "before" not in metrics:
            metrics["before"] = trainer.evaluate()
            store.set_metrics(job.id, metrics, ctx.clock())
        store.set_detail(job.id, None, ctx.clock())
        _notify(ctx, event="started", step=start)
        pending: list[tuple[int, float]] = []
        last_write = ctx.clock()
        every = ctx.config.checkpoint_every
        for step in range(start + 1, job.total_steps + 1):
            _check(ctx)
            loss = trainer.step(step)
            pending.append((step, loss))
            now = ctx.clock()
            if (
                step % every == 0
                or step == job.total_steps
                or now - last_write >= _PROGRESS_EVERY_S
            ):
                store.progress(job.id, step, pending, now)
                pending, last_write = [], now
            if step % every == 0 and step < job.total_steps:
                store.checkpoint(job.id, step, _save_checkpoint(ctx, trainer, step), now)
            _notify(ctx, event="step", step=step, loss=loss, tokens=trainer.tokens_per_step)
        _check(ctx)
        metrics["after"] = trainer.evaluate()
        store.set_metrics(job.id, metrics, ctx.clock())
        out = trainer.export(output_path(ctx.config, job.output_name), base, job.output_name)
        lora_base = job.model_name if job.job_type in ("lora", "rlhf") else None
        return JobResult("completed", out, lora_base)
    except Interrupted:
        return JobResult("cancelled" if ctx.cancel.is_set() else "stopped")
