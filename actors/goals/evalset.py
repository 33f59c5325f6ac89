"""Evaluation sets: what an evaluate step scores, read from an allowed directory.

A `.jsonl` file holds one record per line: `{"text": ...}` (every token scored),
`{"prompt": ..., "completion": ...}` (only the completion's tokens scored, given the prompt) or
`{"prompt": ..., "chosen": ..., "rejected": ...}` (the chosen answer scored, as a completion).
Any other file is one text. Errors name the file, the line (1-based) and the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from actors.goals.errors import EvalSetInvalid

MAX_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class EvalRecord:
    """One scored piece: the completion's tokens are scored, given the prompt."""

    prompt: str
    completion: str


def parse_jsonl(lines: Iterable[str], path: str) -> tuple[EvalRecord, ...]:
    """Parse JSONL evaluation records; raise EvalSetInvalid naming the line and field."""
    records: list[EvalRecord] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvalSetInvalid(
                "eval_path", f"{path} line {number}: not JSON ({exc.msg})"
            ) from None
        if not isinstance(item, dict):
            raise EvalSetInvalid("eval_path", f"{path} line {number}: not a JSON object")
        if "text" in item:
            records.append(EvalRecord("", _field(item, "text", path, number)))
        elif "completion" in item:
            records.append(
                EvalRecord(
                    _field(item, "prompt", path, number), _field(item, "completion", path, number)
                )
            )
        elif "chosen" in item:
            records.append(
                EvalRecord(
                    _field(item, "prompt", path, number), _field(item, "chosen", path, number)
                )
            )
        else:
            raise EvalSetInvalid(
                "eval_path",
                f"{path} line {number}: needs text, prompt/completion or prompt/chosen",
            )
    if not records:
        raise EvalSetInvalid("eval_path", f"{path}: no records")
    return tuple(records)


def _field(item: dict[str, object], key: str, path: str, number: int) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise EvalSetInvalid("eval_path", f"{path} line {number}: field {key!r} must be a string")
    return value


def allowed(path: str | Path, dirs: Sequence[str | Path]) -> Path:
    """Return the resolved path if it lies inside one of `dirs`, else raise EvalSetInvalid."""
    resolved = Path(path).expanduser().resolve()
    for d in dirs:
        root = Path(d).expanduser().resolve()
        if resolved == root or root in resolved.parents:
            return resolved
    where = ", ".join(str(d) for d in dirs) or "none are configured"
    raise EvalSetInvalid("eval_path", f"{path} is outside the evaluation directories ({where})")


def read_eval_set(path: str | Path, dirs: Sequence[str | Path]) -> tuple[EvalRecord, ...]:
    """Read and check an evaluation set that lies inside `dirs`."""
    resolved = allowed(path, dirs)
    try:
        size = resolved.stat().st_size
        if size > MAX_BYTES:
            raise EvalSetInvalid("eval_path", f"{path}: {size} bytes, more than {MAX_BYTES}")
        text = resolved.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EvalSetInvalid("eval_path", f"cannot read {path}: {exc}") from exc
    if resolved.suffix == ".jsonl":
        return parse_jsonl(text.splitlines(), str(path))
    if not text.strip():
        raise EvalSetInvalid("eval_path", f"{path}: empty")
    return (EvalRecord("", text),)
