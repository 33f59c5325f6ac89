"""LoRA training through the LearningActor versus a plain torch loop, and submit-to-served time.

Measures in one run, on a generated "small" llama GGUF (~2.4M parameters) and one corpus:
- training tokens/s of a LoRA job through the LearningActor (job store, progress rows,
  checkpoints, its thread) vs a plain torch loop over the same model, adapters, batches and
  optimizer in this thread (goal >= 0.9x);
- time from `submit` to the adapter being served: the job trains, writes the GGUF adapter, and
  the register callback starts a real worker process (llama.cpp with `lora_path`) and completes
  one inference through it.
Both loops use the same torch thread count. Prints a table; `--json` adds one JSON object as the
last line: {"throughput_ratio", "submit_to_served_s", ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

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
from actors.types import GenerationParams, InferRequest
from actors.worker_client import WorkerProcess, WorkerSpec

SENTENCES = [
    f"The {a} {v} on the {n} while the {b} watched from the {m}."
    for a in ("cat", "dog", "bird", "fox", "cow")
    for v in ("sat", "slept", "stood", "waited")
    for b, n, m in (("owl", "mat", "tree"), ("hen", "log", "barn"), ("pig", "rug", "gate"))
]


def plain_loop(model_path: Path, data: Path, tp: Any) -> float:
    """Train LoRA with a bare torch loop; return tokens/s over the steps after the first."""
    tok = Tokenizer(model_path)
    items = build_examples(load_dataset(data, "lora", (str(data.parent),)), tok, tp.seq_len)
    train, _ = split_eval(items, tp.eval_fraction, tp.seed)
    model = load_llama(model_path)
    adapters = attach_lora(model, rank=tp.lora_rank, alpha=tp.lora_alpha, seed=tp.seed)
    opt = torch.optim.Adam(lora_parameters(adapters), lr=tp.lr)
    import numpy as np

    tokens, began = 0, 0.0
    for step in range(1, tp.steps + 1):
        rng = np.random.default_rng([tp.seed, step])
        batch = [train[int(i)] for i in rng.choice(len(train), size=tp.batch_size)]
        inputs, targets, mask = collate(batch)
        logits = model(inputs)
        loss = (
            torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            * mask
        ).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora_parameters(adapters), 1.0)
        opt.step()
        if step == 1:
            began = time.perf_counter()
        else:
            tokens += sum(len(e.tokens) for e in batch)
    return tokens / (time.perf_counter() - began)


def through_actor(model_path: Path, data: Path, tp: Any, state: Path) -> dict[str, float]:
    """Run the same job through the LearningActor; serve its adapter in a worker."""
    stamps: dict[int, float] = {}
    tokens: dict[int, int] = {}
    served = threading.Event()
    result: dict[str, float] = {}

    def on_progress(event: dict[str, Any]) -> None:
        if event["event"] == "step":
            stamps[event["step"]] = time.perf_counter()
            tokens[event["step"]] = event["tokens"]

    def register(name: str, path: Path, base: str | None) -> None:
        worker = WorkerProcess(
            WorkerSpec(
                name=name, path=str(model_path), backend="gguf", n_ctx=256, lora_path=str(path)
            ),
            runtime_dir=Path(tempfile.mkdtemp(prefix="moc-b-")),
        )
        worker.start()
        try:
            worker.run(
                InferRequest(
                    model=name,
                    prompt="The cat",
                    params=GenerationParams(max_tokens=8, temperature=0.0),
                )
            )
        finally:
            worker.stop()
        result["served_at"] = time.perf_counter()
        served.set()

    config = LearningConfig(
        job_store=str(state / "jobs.db"),
        output_dir=str(state / "out"),
        dataset_dirs=(str(data.parent),),
        checkpoint_every=max(tp.steps // 4, 1),
        torch_threads=torch.get_num_threads(),
    )
    ref = LearningActor.start(
        config,
        claim=lambda job_id, mb: True,
        release=lambda job_id: None,
        resolve_model=lambda name: model_path,
        register=register,
        on_progress=on_progress,
    )
    try:
        submitted = time.perf_counter()
        ref.proxy().submit(
            {
                "job_type": "lora",
                "model_name": "small",
                "dataset_path": str(data),
                "training_params": tp.as_dict(),
            }
        ).get()
        if not served.wait(600):
            raise SystemExit("the adapter was not served within 600 s")
    finally:
        ref.stop()
    steps = sorted(stamps)
    n = sum(tokens[s] for s in steps[1:])
    return {
        "tok_s": n / (stamps[steps[-1]] - stamps[steps[0]]),
        "submit_to_served_s": result["served_at"] - submitted,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (under two minutes)")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = 30 if args.quick else 120
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
        # Plain runs before and after the actor's; the faster one is the anchor, so warm-up and
        # load drift on a shared machine cannot flatter the actor.
        first = plain_loop(model, data, tp)
        actor = through_actor(model, data, tp, root / "state")
        plain = max(first, plain_loop(model, data, tp))
    ratio = actor["tok_s"] / plain
    rows = [
        ("plain torch loop (tokens/s)", f"{plain:,.0f}"),
        ("LearningActor job (tokens/s)", f"{actor['tok_s']:,.0f}"),
        ("throughput ratio (goal >= 0.9)", f"{ratio:.3f}"),
        ("submit -> adapter served (s)", f"{actor['submit_to_served_s']:.2f}"),
    ]
    print(
        f"model small (2.4M params), LoRA rank {tp.lora_rank}, {steps} steps, batch {tp.batch_size}x{tp.seq_len}, torch threads {torch.get_num_threads()}"
    )
    for name, value in rows:
        print(f"  {name:<34} {value:>10}")
    if args.json:
        print(
            json.dumps(
                {
                    "throughput_ratio": round(ratio, 4),
                    "submit_to_served_s": round(actor["submit_to_served_s"], 3),
                    "plain_tok_s": round(plain, 1),
                    "actor_tok_s": round(actor["tok_s"], 1),
                    "steps": steps,
                    "torch_threads": torch.get_num_threads(),
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
