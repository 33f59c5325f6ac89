"""Evaluation sets: JSONL records or plain text, refused outside the allowed directories."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors.goals.errors import EvalSetInvalid
from actors.goals.evalset import EvalRecord, parse_jsonl, read_eval_set


def test_each_record_kind_becomes_a_prompt_and_the_scored_completion() -> None:
    lines = [
        '{"text": "hello"}',
        "",
        '{"prompt": "Q", "completion": "A"}',
        '{"prompt": "P", "chosen": "good", "rejected": "bad"}',
    ]
    assert parse_jsonl(lines, "e.jsonl") == (
        EvalRecord("", "hello"),
        EvalRecord("Q", "A"),
        EvalRecord("P", "good"),
    )


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"text": "a"}', "{oops"], "e.jsonl line 2: not JSON"),
        (["[1, 2]"], "e.jsonl line 1: not a JSON object"),
        (['{"text": 3}'], "e.jsonl line 1: field 'text' must be a string"),
        (['{"completion": "x"}'], "e.jsonl line 1: field 'prompt' must be a string"),
        (['{"label": "x"}'], "e.jsonl line 1: needs text, prompt/completion or prompt/chosen"),
        (["", "  "], "e.jsonl: no records"),
    ],
    ids=["bad-json", "not-an-object", "text-not-a-string", "no-prompt", "no-known-field", "empty"],
)
def test_a_bad_line_is_refused_naming_the_line_and_field(lines: list[str], message: str) -> None:
    with pytest.raises(EvalSetInvalid, match=message):
        parse_jsonl(lines, "e.jsonl")


def test_a_file_outside_the_allowed_directories_is_refused(tmp_path: Path) -> None:
    inside = tmp_path / "data"
    inside.mkdir()
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    with pytest.raises(EvalSetInvalid, match="outside the evaluation directories"):
        read_eval_set(outside, [inside])
    with pytest.raises(EvalSetInvalid, match="outside"):
        read_eval_set(inside / ".." / "secret.txt", [inside])


def test_a_plain_text_file_is_one_record(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one long text\n")
    assert read_eval_set(tmp_path / "a.txt", [tmp_path]) == (EvalRecord("", "one long text\n"),)
