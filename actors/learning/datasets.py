"""Datasets: JSONL files inside the configured dataset directories, validated line by line.

Three record kinds, decided by the first record and required of every line:
`text` ({"text": ...}), `prompt_completion` ({"prompt": ..., "completion": ...}) and
`preference` ({"prompt": ..., "chosen": ..., "rejected": ...}). Every error names the file, the
line (1-based) and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from actors.learning.errors import DatasetInvalid, DatasetNotAllowed

Kind = Literal["text", "prompt_completion", "preference"]
FIELDS: dict[str, tuple[str, ...]] = {
    "preference": ("prompt", "chosen", "rejected"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
# Record kinds each job type trains on.
ACCEPTS: dict[str, tuple[str, ...]] = {
    "lora": ("text", "prompt_completion"),
    "fine_tune": ("text", "prompt_completion"),
    "distillation": ("text", "prompt_completion"),
    "rlhf": ("preference",),
}
MAX_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Dataset:
    """A validated dataset: its kind and its records (dicts of the kind's string fields)."""

    path: str
    kind: Kind
    records: tuple[dict[str, str], ...]


def allowed_path(path: str | Path, dataset_dirs: tuple[str, ...]) -> Path:
    """Return the resolved path if it lies inside one of `dataset_dirs`, else raise."""
    resolved = Path(path).expanduser().resolve()
    for d in dataset_dirs:
        root = Path(d).expanduser().resolve()
        if resolved == root or root in resolved.parents:
            return resolved
    where = (
        ", ".join(dataset_dirs) if dataset_dirs else "none are configured ([learning] dataset_dirs)"
    )
    raise DatasetNotAllowed(f"dataset {path} is outside the dataset directories ({where})")


def _kind_of(record: dict[str, object]) -> Kind | None:
    for kind, fields in FIELDS.items():
        if all(f in record for f in fields):
            return kind  # type: ignore[return-value]
    return None


def parse_records(text: str, path: str, job_type: str) -> Dataset:
    """Validate JSONL `text` for `job_type`; raise DatasetInvalid naming line and field."""
    accepted = ACCEPTS[job_type]
    kind: Kind | None = None
    records: list[dict[str, str]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetInvalid(path, lineno, "line", f"not valid JSON ({exc.msg})") from exc
        if not isinstance(record, dict):
            raise DatasetInvalid(path, lineno, "line", "each line must be a JSON object")
        if kind is None:
            found = _kind_of(record)
            wanted = " or ".join("/".join(FIELDS[k]) for k in accepted)
            if found is None or found not in accepted:
                missing = next(f for f in FIELDS[accepted[0]] if f not in record)
                raise DatasetInvalid(
                    path, lineno, missing, f"a {job_type} dataset needs fields {wanted}"
                )
            kind = found
        fields = FIELDS[kind]
        for f in fields:
            if f not in record:
                raise DatasetInvalid(
                    path, lineno, f, f"missing (every line needs {', '.join(fields)})"
                )
            value = record[f]
            if not isinstance(value, str):
                raise DatasetInvalid(
                    path, lineno, f, f"must be a string, not {type(value).__name__}"
                )
            if not value and f != "prompt":
                raise DatasetInvalid(path, lineno, f, "must not be empty")
        records.append({f: record[f] for f in fields})
    if kind is None or not records:
        raise DatasetInvalid(path, 1, "line", "the dataset has no records")
    return Dataset(path, kind, tuple(records))


def load_dataset(path: str | Path, job_type: str, dataset_dirs: tuple[str, ...]) -> Dataset:
    """Check that `path` is allowed and readable, then validate it for `job_type`."""
    resolved = allowed_path(path, dataset_dirs)
    if not resolved.is_file():
        raise DatasetInvalid(str(path), 0, "dataset_path", "no such file")
    if resolved.stat().st_size > MAX_BYTES:
        raise DatasetInvalid(str(path), 0, "dataset_path", f"larger than {MAX_BYTES >> 20} MiB")
    try:
        text = resolved.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetInvalid(str(path), 0, "dataset_path", f"not UTF-8 ({exc.reason})") from exc
    return parse_records(text, str(resolved), job_type)
