"""DPO raises the chosen-over-rejected margin; distillation lowers the student's KL to the teacher."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from actors.gguf_synth import write_preset
from actors.learning.datasets import parse_records
from actors.learning.llama_torch import load_llama
from actors.learning.spec import parse_params
from actors.learning.tokenizer import Tokenizer
from actors.learning.trainers import build_examples, make_trainer
from tests.actors.learning.conftest import CORPUS
from tests.actors.learning.test_forward import llama_logits, torch_logits

PAIRS = [
    {
        "prompt": f"Q: what did the {a} do? A:",
        "chosen": f" The {a} sat.",
        "rejected": f" The {a} flew away!",
    }
    for a in ("cat", "dog", "bird", "fox", "cow", "hen", "pig", "owl")
]


def params(job_type: str, **kw: object):  # type: ignore[no-untyped-def]
    return parse_params(
        {"seq_len": 48, "batch_size": 4, "seed": 3, "eval_fraction": 0.25, **kw},
        job_type,
        default_steps=10,
        max_steps=1000,
    )


def test_dpo_raises_the_chosen_over_rejected_margin_and_its_adapter_loads(
    tiny_gguf: Path, tmp_path: Path
) -> None:
    import json

    ds = parse_records("\n".join(json.dumps(p) for p in PAIRS), "pairs.jsonl", "rlhf")
    tp = params("rlhf", steps=40, lr=5e-3, beta=0.5)
    trainer = make_trainer(
        "rlhf", load_llama(tiny_gguf), tp, build_examples(ds, Tokenizer(tiny_gguf), tp.seq_len)
    )
    before = trainer.evaluate()
    for step in range(1, tp.steps + 1):
        trainer.step(step)
    after = trainer.evaluate()
    assert after["margin"] > before["margin"] + 5.0, (before, after)
    assert after["eval_loss"] < before["eval_loss"]
    adapter = trainer.export(tmp_path / "dpo.gguf", tiny_gguf, "dpo")
    ids = Tokenizer(tiny_gguf).encode(PAIRS[0]["prompt"], bos=True)
    diff = np.abs(
        torch_logits(trainer.model.eval(), ids, "f32")
        - llama_logits(tiny_gguf, ids, kv_f32=True, lora=adapter)
    )
    assert diff.max() < 1e-4


def test_distillation_lowers_the_students_kl_to_the_teacher(
    tiny_gguf: Path, tmp_path: Path
) -> None:
    import json

    teacher_path = write_preset(tmp_path / "teacher.gguf", "tiny", seed=9)
    ds = parse_records(
        "\n".join(json.dumps({"text": s}) for s in CORPUS), "t.jsonl", "distillation"
    )
    tp = params("distillation", steps=30, lr=3e-3, teacher="teacher")
    tok = Tokenizer(tiny_gguf)
    trainer = make_trainer(
        "distillation",
        load_llama(tiny_gguf),
        tp,
        build_examples(ds, tok, tp.seq_len),
        load_llama(teacher_path),
    )
    before = trainer.evaluate()["kl"]
    for step in range(1, tp.steps + 1):
        trainer.step(step)
    after = trainer.evaluate()["kl"]
    assert after < 0.5 * before, (before, after)
    out = trainer.export(tmp_path / "student.gguf", tiny_gguf, "student")
    ids = tok.encode("The cat sat", bos=True)
    diff = np.abs(torch_logits(load_llama(out), ids, "f32") - llama_logits(out, ids, kv_f32=True))
    assert diff.max() < 1e-4


def test_distillation_without_a_teacher_is_refused_naming_the_field() -> None:
    from actors.learning.errors import InvalidJobSpec

    with pytest.raises(InvalidJobSpec, match="training_params.teacher"):
        parse_params({}, "distillation", default_steps=10, max_steps=100)
