"""LoRA training through the LearningActor versus a plain torch loop, and submit-to-served time.

Measures in one run, on a generated "small" llama GGUF (~2.4M parameters) and one corpus:
- steady-state training tokens/s of a LoRA job through the LearningActor (its own process
  forked from the fork server, job store, progress rows, checkpoints, events pipe) vs a plain
  torch loop in this thread over the same model, adapters, batches and optimizer (goal >= 0.9x).
  Both count the same steps and exclude the same first WARMUP_STEPS; the rounds alternate the
  order (plain then job, job then plain) and each side's best round is compared;
- time from `submit` to the job's first step and to the adapter being served: the job trains,
  writes the GGUF adapter, and the register callback starts a real worker process (llama.cpp
  with `lora_path`) and completes one inference through it. The first submit starts the fork
  server (torch imported once), so the first job is reported apart from the later ones.
Both loops use the same torch thread count. Prints a table; `--json` adds one JSON object as the
last line: {"throughput_ratio", "submit_to_served_s", ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actors.gguf_synth import write_preset
from actors.learning.actor import LearningActor
from actors.learning.config import LearningConfig
from actors.learning.datasets import load_dataset
from actors.learning.llama_torch import load_llama
from actors.learning.lora import attach_lora, lora_parameters
from actors.learning.spec import parse_params
from actors.learning.tokenizer import Tokenizer
from actors.learning.trainers import build_examples, collate, split_eval
from actors.types import GenerationParams, InferRequest, InferResult
from actors.worker.client import WorkerProcess
from actors.worker.handle import WorkerSpec
from actors.worker.protocol import LoadSpec

SENTENCES = [
    f"The {a} {v} on the {n} while the {b} watched from the {m}."
    for a in ("cat", "dog", "bird", "fox", "cow")
    for v in ("sat", "slept", "stood", "waited")
    for b, n, m in (("owl", "mat", "tree"), ("hen", "log", "barn"), ("pig", "rug", "gate"))
]


WARMUP_STEPS = 2  # excluded on both sides: the first steps pay lazy initialisation (Adam, autograd)


def steady_tok_s(ends: dict[int, float], tokens: dict[int, int]) -> float:
    """Return tokens/s from the end of step WARMUP_STEPS to the end of the last step."""
    last = max(ends)
    counted = sum(tokens[s] for s in range(WARMUP_STEPS + 1, last + 1))
    return counted / (ends[last] - ends[WARMUP_STEPS])


def plain_loop(model_path: Path, data: Path, tp: Any) -> float:
    """Train LoRA with a bare torch loop in this thread; return steady-state tokens/s.

    The same model, adapters, optimizer, batches (seeded by step, drawn as the trainer draws
    them) and loss as a LoRA job, and nothing else: no store, no events, no checkpoints.
    """
    tok = Tokenizer(model_path)
    items = build_examples(load_dataset(data, "lora", (str(data.parent),)), tok, tp.seq_len)
    train, _ = split_eval(items, tp.eval_fraction, tp.seed)
    model = load_llama(model_path)
    adapters = attach_lora(model, rank=tp.lora_rank, alpha=tp.lora_alpha, seed=tp.seed)
    params = lora_parameters(adapters)
    opt = torch.optim.Adam(params, lr=tp.lr)
    ends: dict[int, float] = {}
    tokens: dict[int, int] = {}
    for step in range(1, tp.steps + 1):
        rng = np.random.default_rng([tp.seed, step])
        idx = rng.choice(len(train), size=tp.batch_size, replace=len(train) < tp.batch_size)
        batch = [train[int(i)] for i in idx]
        inputs, targets, mask = collate(batch)
        logits = model(inputs)
        loss = (
            torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            * mask
        ).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ends[step] = time.perf_counter()
        tokens[step] = sum(len(e.tokens) for e in batch)
    return steady_tok_s(ends, tokens)



async def serve_once(worker: WorkerProcess, req: InferRequest) -> InferResult:
    """Serve one request through a channel to the worker, as the node's lane does."""
    channel = worker.open_channel()
    try:
        return await channel.infer(req)
    finally:
        channel.close()

class ActorRun:
    """A LearningActor whose jobs' adapters are served, one job at a time, with timings."""

    def __init__(self, model_path: Path, data: Path, tp: Any, state: Path) -> None:
        self.model_path, self.data, self.tp = model_path, data, tp
        self.ends: dict[int, float] = {}
        self.tokens: dict[int, int] = {}
        self.served = threading.Event()
        self.served_at = 0.0
        config = LearningConfig(
            job_store=str(state / "jobs.db"),
            output_dir=str(state / "out"),
            dataset_dirs=(str(data.parent),),
            checkpoint_every=max(tp.steps // 4, 1),
            torch_threads=torch.get_num_threads(),
        )
        self.ref = LearningActor.start(
            config,
            claim=lambda job_id, mb: True,
            release=lambda job_id: None,
            resolve_model=lambda name: model_path,
            register=self._register,
            on_progress=self._on_progress,
        )

    def _on_progress(self, event: dict[str, Any]) -> None:
        if event["event"] == "step":
            self.ends[event["step"]] = time.perf_counter()
            self.tokens[event["step"]] = event["tokens"]

    def _register(self, name: str, path: Path, base: str | None) -> None:
        load = LoadSpec("gguf", str(self.model_path), n_ctx=256, lora_path=str(path))
        worker = WorkerProcess(
            WorkerSpec(name, load), runtime_dir=Path(tempfile.mkdtemp(prefix="moc-b-"))
        )
        worker.start()
        try:
            asyncio.run(
                serve_once(
                    worker,
                    InferRequest(
                        model=name,
                        prompt="The cat",
                        params=GenerationParams(max_tokens=8, temperature=0.0),
                    ),
                )
            )
        finally:
            worker.stop()
        self.served_at = time.perf_counter()
        self.served.set()

    def job(self) -> dict[str, float]:
        """Submit one LoRA job; return its steady tokens/s, submit->first step and ->served."""
        self.ends.clear()
        self.tokens.clear()
        self.served.clear()
        submitted = time.perf_counter()
        self.ref.proxy().submit(
            {
                "job_type": "lora",
                "model_name": "small",
                "dataset_path": str(self.data),
                "training_params": self.tp.as_dict(),
            }
        ).get()
        if not self.served.wait(600):
            raise SystemExit("the adapter was not served within 600 s")
        return {
            "tok_s": steady_tok_s(self.ends, self.tokens),
            "first_step_s": self.ends[1] - submitted,
            "served_s": self.served_at - submitted,
        }

    def stop(self) -> None:
        """Stop the actor."""
        self.ref.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (under two minutes)")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--rounds", type=int, default=0, help="rounds (0 = 2 quick, 3 full)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = 30 if args.quick else 120
    rounds = args.rounds or (2 if args.quick else 3)
    plain: list[float] = []
    jobs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="moc-bench-") as tmp:
        root = Path(tmp)
        model = write_preset(root / "small.gguf", "small", seed=2)
        data = root / "data" / "text.jsonl"
        data.parent.mkdir()
        data.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
        tp = parse_params(
            {"steps": steps, "seq_len": 64, "batch_size": 4, "lr": 2e-3, "seed": 1},
            "lora",
            default_steps=steps,
            max_steps=10_000,
        )
        runner = ActorRun(model, data, tp, root / "state")
        try:
            for r in range(rounds):
                # Alternate the order (plain-job, job-plain, ...) so load drift on a shared
                # machine favours neither side.
                if r % 2 == 0:
                    plain.append(plain_loop(model, data, tp))
                    jobs.append(runner.job())
                else:
                    jobs.append(runner.job())
                    plain.append(plain_loop(model, data, tp))
        finally:
            runner.stop()
    # Best of the rounds on each side: the least disturbed run of each.
    best_plain, best_job = max(plain), max(j["tok_s"] for j in jobs)
    ratio = best_job / best_plain
    first, later = jobs[0], jobs[1:] or jobs[:1]
    served = min(j["served_s"] for j in later)
    first_step = min(j["first_step_s"] for j in later)
    print(
        f"model small (2.4M params), LoRA rank {tp.lora_rank}, {steps} steps "
        f"(first {WARMUP_STEPS} excluded on both sides), batch {tp.batch_size}x{tp.seq_len}, "
        f"torch threads {torch.get_num_threads()}, {rounds} rounds"
    )
    for r, (p, j) in enumerate(zip(plain, jobs, strict=True), 1):
        print(
            f"  round {r}: plain {p:,.0f} tok/s, job {j['tok_s']:,.0f} tok/s "
            f"(ratio {j['tok_s'] / p:.3f}), submit -> first step {j['first_step_s']:.2f} s, "
            f"-> served {j['served_s']:.2f} s"
        )
    rows = [
        ("plain torch loop, best (tokens/s)", f"{best_plain:,.0f}"),
        ("LearningActor job, best (tokens/s)", f"{best_job:,.0f}"),
        ("throughput ratio (goal >= 0.9)", f"{ratio:.3f}"),
        ("submit -> first step, first job (s)", f"{first['first_step_s']:.2f}"),
        ("submit -> first step, later (s)", f"{first_step:.2f}"),
        ("submit -> adapter served, later (s)", f"{served:.2f}"),
    ]
    for name, value in rows:
        print(f"  {name:<38} {value:>10}")
    if args.json:
        print(
            json.dumps(
                {
                    "throughput_ratio": round(ratio, 4),
                    "submit_to_served_s": round(served, 3),
                    "submit_to_first_step_s": round(first_step, 3),
                    "first_job_submit_to_first_step_s": round(first["first_step_s"], 3),
                    "first_job_submit_to_served_s": round(first["served_s"], 3),
                    "plain_tok_s": [round(p, 1) for p in plain],
                    "actor_tok_s": [round(j["tok_s"], 1) for j in jobs],
                    "steps": steps,
                    "warmup_steps": WARMUP_STEPS,
                    "rounds": rounds,
                    "torch_threads": torch.get_num_threads(),
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
