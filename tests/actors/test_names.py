"""Table tests of `actors.names`: which names, titles, texts and paths a client may send."""

from __future__ import annotations

from typing import Any

import pytest

from actors import names
from actors.errors import InvalidRequest

LONE = "\ud800"

# (value, the start of the reason it is refused, or None when it is accepted)
MODEL_NAMES: list[tuple[str, Any, str | None]] = [
    ("plain", "tiny", None),
    ("a job's default output", "tiny@0123456789ab", None),
    ("ollama style", "llama3:8b-q4_0", None),
    ("non-ASCII letters", "modèle-日本", None),
    ("exactly 128 bytes", "x" * 128, None),
    ("129 bytes", "x" * 129, "is 129 bytes"),
    ("64 three-byte characters are 192 bytes", "日" * 64, "is 192 bytes"),
    ("empty", "", "must not be empty"),
    ("not a string", 7, "expected a string"),
    ("None", None, "expected a string"),
    ("a lone surrogate", f"sur{LONE}x", "contains a lone surrogate at character 3"),
    ("a NUL byte", "a\x00b", "contains a control"),
    ("an escape character", "a\x1b[31m", "contains a control"),
    ("a newline", "a\nb", "contains whitespace"),
    ("a space", "a b", "contains whitespace"),
    ("only a space", " ", "contains whitespace"),
    ("a zero-width space (Cf)", "a\u200bb", "contains a control"),
    ("a slash", "a/b", "contains a path separator"),
    ("a backslash", "a\\b", "contains a path separator"),
    ("dot-dot", "..", "must not start with '.'"),
    ("a hidden file name", ".tiny", "must not start with '.'"),
]


@pytest.mark.parametrize(
    ("value", "reason"), [c[1:] for c in MODEL_NAMES], ids=[c[0] for c in MODEL_NAMES]
)
def test_a_model_name_is_accepted_or_refused_with_its_reason(
    value: Any, reason: str | None
) -> None:
    problem = names.name_problem(value)
    if reason is None:
        assert problem is None
        assert names.check_name(value, "model_name") == value
    else:
        assert problem is not None and problem.startswith(reason), problem
        with pytest.raises(InvalidRequest) as refused:
            names.check_name(value, "model_name")
        assert refused.value.field == "model_name"
        assert str(refused.value) == f"model_name: {problem}"


TITLES: list[tuple[str, Any, str | None]] = [
    ("words and spaces", "Make the cat model better", None),
    ("256 characters", "t" * 256, None),
    ("257 characters", "t" * 257, "is 257 characters"),
    ("blank", "   ", "must not be blank"),
    ("empty", "", "must not be empty"),
    ("a lone surrogate", f"goal {LONE}", "contains a lone surrogate"),
    ("a tab", "a\tb", "contains a control"),
    ("a NUL byte", "a\x00", "contains a control"),
    ("a number", 3, "expected a string"),
]


@pytest.mark.parametrize(("value", "reason"), [c[1:] for c in TITLES], ids=[c[0] for c in TITLES])
def test_a_title_is_accepted_or_refused_with_its_reason(value: Any, reason: str | None) -> None:
    problem = names.title_problem(value)
    if reason is None:
        assert problem is None
    else:
        assert problem is not None and problem.startswith(reason), problem


TEXTS: list[tuple[str, Any, str | None]] = [
    ("ASCII", "hello", None),
    ("empty", "", None),
    ("a valid pair", "smile \U0001f600", None),
    ("control characters are text", "a\x00\nb\t", None),
    ("a lone high surrogate", f"hi {LONE}", "contains a lone surrogate at character 3"),
    ("a lone low surrogate", "\udc80", "contains a lone surrogate at character 0"),
    ("bytes", b"hello", "expected a string"),
]


@pytest.mark.parametrize(("value", "reason"), [c[1:] for c in TEXTS], ids=[c[0] for c in TEXTS])
def test_text_is_refused_only_when_utf8_cannot_carry_it(value: Any, reason: str | None) -> None:
    problem = names.text_problem(value)
    if reason is None:
        assert problem is None
    else:
        assert problem is not None and problem.startswith(reason), problem


PATHS: list[tuple[str, Any, str | None]] = [
    ("relative", "tiny.gguf", None),
    ("absolute", "/models/a/b.gguf", None),
    ("4094 bytes", "/".join(["d" * 200] * 20) + "/" + "f" * 74, None),
    ("5,000 characters", "a/" * 2500, "is 5000 bytes"),
    ("a 256-byte component", "/models/" + "f" * 256, "has a component longer than 255"),
    ("a NUL byte", "a\x00.gguf", "contains a NUL byte"),
    ("a lone surrogate", f"{LONE}.gguf", "contains a lone surrogate"),
    ("empty", "", "must not be empty"),
]


@pytest.mark.parametrize(("value", "reason"), [c[1:] for c in PATHS], ids=[c[0] for c in PATHS])
def test_a_path_is_refused_before_the_kernel_would_refuse_it(
    value: Any, reason: str | None
) -> None:
    problem = names.path_problem(value)
    if reason is None:
        assert problem is None
    else:
        assert problem is not None and problem.startswith(reason), problem
