"""Job specs: parse and check what a client submits, before anything runs (pure, no I/O).

Legacy-compatible fields: `job_type` (lora | fine_tune | rlhf | distillation), `model_name`,
`dataset_path`, `priority` (critical | high | medium | low, or an integer; higher runs first),
`training_params` and `output_name` (default `<model_name>@<job id>`). Names follow
`actors.names` (the output becomes a model name and a file name). `replace` (default false)
lets the output take the name of an existing model; without it such a job is refused.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from actors import names
from actors.errors import InvalidRequest
from actors.learning.errors import InvalidJobSpec

JobType = Literal["lora", "fine_tune", "rlhf", "distillation"]
JOB_TYPES: tuple[str, ...] = ("lora", "fine_tune", "rlhf", "distillation")
DEFAULT_OUTPUT_SUFFIX = "@" + "0" * 12  # the default output is <model_name>@<12-hex job id>
PRIORITIES = {"critical": 3, "high": 2, "medium": 1, "low": 0}
# Default learning rates: adapters take larger steps than whole weights.
_DEFAULT_LR = {"lora": 2e-3, "rlhf": 1e-3, "fine_tune": 5e-4, "distillation": 5e-4}


@dataclass(frozen=True, slots=True)
class TrainParams:
    """How a job trains; every field has a default, so `{}` is a valid `training_params`."""

    steps: int
    lr: float
    batch_size: int = 4
    seq_len: int = 128
    lora_rank: int = 8
    lora_alpha: float = 16.0
    seed: int = 0
    teacher: str | None = None
    beta: float = 0.1
    eval_fraction: float = 0.1

    def as_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A checked job spec."""

    job_type: JobType
    model_name: str
    dataset_path: str
    priority: int
    params: TrainParams
    output_name: str | None
    replace: bool = False
    """True lets the output replace a model of the same name (its model_version changes)."""

    def as_dict(self) -> dict[str, Any]:
        """Return the spec as stored and reported (training_params spelled out)."""
        return {
            "job_type": self.job_type,
            "model_name": self.model_name,
            "dataset_path": self.dataset_path,
            "priority": self.priority,
            "training_params": self.params.as_dict(),
            "output_name": self.output_name,
            "replace": self.replace,
        }


def _string(spec: dict[str, Any], key: str) -> str:
    value = spec.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InvalidJobSpec(key, "required, a non-empty string")
    return value


def _checked(check: Any, value: Any, field: str) -> Any:
    """Run a check of `actors.names`, refusing with this package's error class."""
    try:
        return check(value, field)
    except InvalidRequest as exc:
        raise InvalidJobSpec(exc.field, str(exc).removeprefix(f"{exc.field}: ")) from None


def parse_priority(value: Any) -> int:
    """Map a legacy priority name or an integer onto an integer (higher runs first)."""
    if value is None:
        return PRIORITIES["medium"]
    if isinstance(value, bool):
        raise InvalidJobSpec("priority", "one of critical, high, medium, low or an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.lower() in PRIORITIES:
        return PRIORITIES[value.lower()]
    raise InvalidJobSpec("priority", "one of critical, high, medium, low or an integer")


def _number(raw: dict[str, Any], key: str, default: Any, kind: type, lo: float, hi: float) -> Any:
    value = raw.get(key, default)
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok or not lo <= value <= hi:
        what = "an integer" if kind is int else "a number"
        raise InvalidJobSpec(f"training_params.{key}", f"{what} in {lo:g}..{hi:g}")
    return kind(value)


def parse_params(raw: Any, job_type: str, *, default_steps: int, max_steps: int) -> TrainParams:
    """Check `training_params`, naming the field that is wrong."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise InvalidJobSpec("training_params", "must be an object")
    known = set(TrainParams.__dataclass_fields__) | {"learning_rate", "epochs"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise InvalidJobSpec(f"training_params.{unknown[0]}", "unknown parameter")
    if "learning_rate" in raw and "lr" not in raw:  # the legacy spelling
        raw = {**raw, "lr": raw["learning_rate"]}
    teacher = raw.get("teacher")
    if job_type == "distillation" and (not isinstance(teacher, str) or not teacher):
        raise InvalidJobSpec("training_params.teacher", "distillation needs a teacher model name")
    if teacher is not None and not isinstance(teacher, str):
        raise InvalidJobSpec("training_params.teacher", "must be a model name")
    if teacher is not None:
        _checked(names.check_name, teacher, "training_params.teacher")
    return TrainParams(
        steps=_number(raw, "steps", default_steps, int, 1, max_steps),
        lr=_number(raw, "lr", _DEFAULT_LR[job_type], float, 1e-8, 1.0),
        batch_size=_number(raw, "batch_size", 4, int, 1, 1024),
        seq_len=_number(raw, "seq_len", 128, int, 4, 1_048_576),
        lora_rank=_number(raw, "lora_rank", 8, int, 1, 1024),
        lora_alpha=_number(raw, "lora_alpha", 16.0, float, 1e-3, 1e6),
        seed=_number(raw, "seed", 0, int, 0, 2**63 - 1),
        teacher=teacher if job_type == "distillation" else None,
        beta=_number(raw, "beta", 0.1, float, 1e-4, 100.0),
        eval_fraction=_number(raw, "eval_fraction", 0.1, float, 0.0, 0.5),
    )


def parse_spec(spec: Any, *, default_steps: int = 100, max_steps: int = 100_000) -> JobSpec:
    """Check a submitted job spec; raise InvalidJobSpec naming the first bad field."""
    if not isinstance(spec, dict):
        raise InvalidJobSpec("spec", "must be an object")
    job_type = spec.get("job_type", "lora")
    if job_type not in JOB_TYPES:
        raise InvalidJobSpec("job_type", f"one of {', '.join(JOB_TYPES)}")
    output = spec.get("output_name")
    if output is not None:
        _checked(names.check_name, output, "output_name")
    replace = spec.get("replace", False)
    if not isinstance(replace, bool):
        raise InvalidJobSpec("replace", "true or false")
    model_name = _checked(names.check_name, _string(spec, "model_name"), "model_name")
    room = names.MODEL_NAME_MAX_BYTES - len(DEFAULT_OUTPUT_SUFFIX)
    if output is None and len(model_name.encode("utf-8")) > room:
        raise InvalidJobSpec(
            "output_name",
            f"required when model_name is over {room} bytes: the default "
            f"<model_name>@<job id> would be longer than {names.MODEL_NAME_MAX_BYTES}",
        )
    return JobSpec(
        job_type=job_type,
        model_name=model_name,
        dataset_path=_checked(names.check_path, _string(spec, "dataset_path"), "dataset_path"),
        priority=parse_priority(spec.get("priority")),
        params=parse_params(
            spec.get("training_params"),
            job_type,
            default_steps=default_steps,
            max_steps=max_steps,
        ),
        output_name=output,
        replace=replace,
    )
