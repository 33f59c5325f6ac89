"""Trained results served by llama.cpp: a LoRA adapter and a fine-tuned GGUF match torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from actors.learning.datasets import load_dataset
from actors.learning.export import write_model_gguf
from actors.learning.llama_torch import load_llama
from actors.learning.spec import parse_params
from actors.learning.tokenizer import Tokenizer
from actors.learning.trainers import build_examples, make_trainer
from actors.worker.backends import LoadSpec
from actors.worker.backends.gguf_engine import GgufEngine
from tests.actors.learning.test_forward import llama_logits, served, torch_logits

PROMPT = "The fox stood on the"


def train(job_type: str, model_path: Path, dataset_dir: Path, steps: int, **extra: object):  # type: ignore[no-untyped-def]
    tp = parse_params(
        {"steps": steps, "seq_len": 48, "batch_size": 4, "seed": 7, "eval_fraction": 0.2, **extra},
        job_type,
        default_steps=10,
        max_steps=10_000,
    )
    tok = Tokenizer(model_path)
    items = build_examples(
        load_dataset(dataset_dir / "text.jsonl", job_type, (str(dataset_dir),)), tok, tp.seq_len
    )
    trainer = make_trainer(job_type, load_llama(model_path), tp, items)
    before = trainer.evaluate()["eval_loss"]
    for step in range(1, steps + 1):
        trainer.step(step)
    return trainer, before, trainer.evaluate()["eval_loss"], tok


def served_greedy(path: Path, ids: list[int], lora: Path | None = None) -> list[int]:
    llm = served(path, n_ctx=128, lora_path=str(lora) if lora else None)
    try:
        return [t for _, t in zip(range(32), llm.generate(ids, temp=0.0), strict=False)]
    finally:
        llm.close()


def test_a_lora_adapter_lowers_held_out_loss_and_llama_cpp_serves_it_as_torch_computes_it(
    tiny_gguf: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    trainer, before, after, tok = train("lora", tiny_gguf, dataset_dir, steps=60, lr=1e-2)
    assert after < 0.5 * before, (before, after)
    adapter = trainer.export(tmp_path / "adapter.gguf", tiny_gguf, "tiny@lora")
    model = trainer.model.eval()
    ids = tok.encode(PROMPT, bos=True)
    exact = np.abs(
        torch_logits(model, ids, "f32") - llama_logits(tiny_gguf, ids, kv_f32=True, lora=adapter)
    )
    assert exact.max() < 1e-4
    served = np.abs(
        torch_logits(model, ids, "f16") - llama_logits(tiny_gguf, ids, kv_f32=False, lora=adapter)
    )
    assert served.max() < 5e-3
    # The adapter matters: without it llama.cpp's logits are far from the trained model's.
    assert (
        np.abs(torch_logits(model, ids, "f16") - llama_logits(tiny_gguf, ids, kv_f32=False)).max()
        > 1.0
    )
    model.kv_type = "f16"
    continuation = model.greedy(ids, 32)
    assert served_greedy(tiny_gguf, ids, adapter) == continuation
    assert tok.decode(continuation) != tok.decode(load_llama(tiny_gguf).greedy(ids, 32))
    # What is served is the base and its adapter: the adapter is part of model_version.
    plain = GgufEngine.load(LoadSpec("gguf", str(tiny_gguf), n_ctx=128))
    adapted = GgufEngine.load(LoadSpec("gguf", str(tiny_gguf), n_ctx=128, lora_path=str(adapter)))
    try:
        assert adapted.version.startswith(plain.version + "+adapter@")
    finally:
        plain.close()
        adapted.close()


def test_a_fine_tuned_gguf_lowers_held_out_loss_and_llama_cpp_serves_it_as_torch_computes_it(
    tiny_gguf: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    trainer, before, after, tok = train("fine_tune", tiny_gguf, dataset_dir, steps=40, lr=3e-3)
    assert after < 0.5 * before, (before, after)
    out = trainer.export(tmp_path / "tuned.gguf", tiny_gguf, "tiny-tuned")
    ids = tok.encode(PROMPT, bos=True)
    reread = load_llama(out)  # what the file holds, as llama.cpp will read it
    exact = np.abs(torch_logits(reread, ids, "f32") - llama_logits(out, ids, kv_f32=True))
    assert exact.max() < 1e-4
    trained = trainer.model.eval()
    served = np.abs(torch_logits(trained, ids, "f16") - llama_logits(out, ids, kv_f32=False))
    assert served.max() < 5e-3
    trained.kv_type = "f16"
    assert served_greedy(out, ids) == trained.greedy(ids, 32)


def test_a_fine_tuned_q8_0_model_is_written_back_as_q8_0(tmp_path: Path) -> None:
    from actors.gguf_synth import write_preset
    from actors.learning.gguf_io import read_gguf

    base = write_preset(tmp_path / "q8.gguf", "tiny", seed=4, dtype="q8_0")
    weights = read_gguf(base)
    out = write_model_gguf(base, tmp_path / "copy.gguf", weights.tensors, name="copy")
    again = read_gguf(out)
    assert again.types == weights.types
    for name, arr in weights.tensors.items():
        assert np.array_equal(again.tensors[name], arr), name  # q8_0 round trip is exact
