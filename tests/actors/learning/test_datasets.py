"""Dataset validation: errors name the line and the field; paths outside dataset_dirs refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.learning.datasets import load_dataset, parse_records
from actors.learning.errors import DatasetInvalid, DatasetNotAllowed


@pytest.mark.parametrize(
    ("job_type", "text", "line", "field", "words"),
    [
        ("lora", '{"text": "a"}\nnot json\n', 2, "line", "not valid JSON"),
        ("lora", '{"text": "a"}\n{"txt": "b"}\n', 2, "text", "missing"),
        ("lora", '{"text": "a"}\n\n{"text": 3}\n', 3, "text", "must be a string"),
        ("lora", '{"prompt": "p", "completion": ""}\n', 1, "completion", "must not be empty"),
        (
            "rlhf",
            '{"prompt": "p", "chosen": "c"}\n',
            1,
            "rejected",
            "needs fields prompt/chosen/rejected",
        ),
        (
            "rlhf",
            '{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p", "chosen": "c"}\n',
            2,
            "rejected",
            "missing",
        ),
        ("fine_tune", "[1, 2]\n", 1, "line", "JSON object"),
        ("distillation", "\n\n", 1, "line", "no records"),
    ],
    ids=[
        "bad-json",
        "missing-text",
        "wrong-type",
        "empty-completion",
        "not-preference",
        "missing-rejected",
        "not-object",
        "empty-file",
    ],
)
def test_validation_errors_name_the_line_and_the_field(
    job_type: str, text: str, line: int, field: str, words: str
) -> None:
    with pytest.raises(DatasetInvalid) as info:
        parse_records(text, "data.jsonl", job_type)
    assert info.value.line == line and info.value.field == field
    assert f"data.jsonl line {line}" in str(info.value) and words in str(info.value)


def test_each_kind_of_record_is_recognised() -> None:
    assert parse_records('{"text": "x"}', "d", "lora").kind == "text"
    pc = parse_records('{"prompt": "", "completion": "y", "extra": 1}', "d", "fine_tune")
    assert pc.kind == "prompt_completion" and pc.records == ({"prompt": "", "completion": "y"},)
    assert (
        parse_records('{"prompt": "p", "chosen": "a", "rejected": "b"}', "d", "rlhf").kind
        == "preference"
    )


def test_a_path_outside_the_dataset_dirs_is_refused(tmp_path: Path) -> None:
    inside = tmp_path / "data"
    inside.mkdir()
    (inside / "ok.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "secret.jsonl").write_text('{"text": "x"}\n')
    assert load_dataset(inside / "ok.jsonl", "lora", (str(inside),)).records == ({"text": "x"},)
    with pytest.raises(DatasetNotAllowed, match="outside the dataset directories"):
        load_dataset(tmp_path / "secret.jsonl", "lora", (str(inside),))
    with pytest.raises(DatasetNotAllowed):
        load_dataset(inside / ".." / "secret.jsonl", "lora", (str(inside),))
    (inside / "link.jsonl").symlink_to(tmp_path / "secret.jsonl")
    with pytest.raises(DatasetNotAllowed):
        load_dataset(inside / "link.jsonl", "lora", (str(inside),))
    with pytest.raises(DatasetNotAllowed, match="none are configured"):
        load_dataset(inside / "ok.jsonl", "lora", ())
    with pytest.raises(DatasetInvalid, match="no such file"):
        load_dataset(inside / "missing.jsonl", "lora", (str(inside),))
