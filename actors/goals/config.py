"""Configuration of goals: the TOML section [goals]."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path


def _require(cond: bool, key: str, reason: str) -> None:
    if not cond:
        raise ValueError(f"{key}: {reason}")


@dataclass(frozen=True, slots=True)
class GoalsConfig:
    """[goals]: how many goals run at once, where they are kept and how their steps behave."""

    max_active_goals: int = 10
    """Goals whose plans run at the same time (legacy default 10); the rest wait, ordered by
    priority and then age. A running goal mostly waits on its learning job, so this bounds the
    goals in flight, not CPU use: `learning.max_parallel_jobs` bounds the training itself."""
    max_open_goals: int = 100
    """Goals pending or running at once; one more is refused with 429 (`too_many_goals`,
    Retry-After 30 s) until some finish. Ten times the legacy `max_active_goals`: goals are
    plans of minutes to hours, so a hundred waiting is more than a node works through in a
    day, yet a runaway client cannot park thousands. Counted in `max_stored_goals` too."""
    max_stored_goals: int = 1000
    """Goals kept in the store, finished ones included. Retention: at the cap, the oldest
    finished goals (completed, failed, cancelled) are deleted to make room for a new one, so
    history goes back as far as room allows; when every stored goal is still open, a new one
    is refused with 507 (`goal_store_full`), so keep it above `max_open_goals`. With the size
    caps below a goal is at most about 12 KiB: 1000 of them are about 12 MiB of SQLite, and
    a listing reads them all before it cuts its page."""
    max_description_chars: int = 4096
    """Longest goal `description`, in characters; a longer one is refused with 400. It is
    stored and echoed in every listing: a few paragraphs is what a goal needs."""
    max_metadata_bytes: int = 8192
    """Largest goal `metadata`, as compact JSON in UTF-8 bytes; larger is refused with 400.
    Stored and echoed like the description; a legacy goal's metadata holds a few names,
    paths and numbers (under 1 KiB)."""
    goal_store: str = "goals/goals.db"
    """SQLite file (WAL) holding every goal, its steps, their results and progress. A relative
    path is resolved against `node.state_dir` (see `resolved`)."""
    poll_interval_s: float = 1.0
    """Seconds between two looks of a train step at its learning job (status, progress). Shorter
    reports progress sooner and notices the end sooner, at one cheap actor call per look."""
    default_min_improvement: float = 0.01
    """Relative improvement a legacy goal's gate demands of the candidate over the base
    (0.01: a loss at least 1% lower). A plan's own gate step states its own."""
    legacy_job_type: str = "lora"
    """Learning job type of a legacy goal's train step when its metadata names none. LoRA is the
    cheapest job that changes what the model says, and its adapter is served on top of the base."""
    eval_dirs: tuple[str, ...] = ()
    """Directories evaluation sets may be read from, in addition to the learning dataset
    directories the node passes in; an `eval_path` elsewhere is refused, so a client cannot make
    the node read arbitrary files."""
    eval_max_tokens: int = 8192
    """Most tokens scored per model in one evaluate step (unless the step says otherwise); the
    rest of the set is ignored. Bounds an evaluation to seconds on a CPU for small models."""
    eval_n_ctx: int = 512
    """Context window of the evaluation, in tokens: longer texts are scored in windows of this
    size. llama.cpp keeps the logits of every position (`logits_all`), n_ctx * n_vocab floats,
    so this bounds the evaluation's memory."""
    eval_timeout_s: float = 1800.0
    """Seconds one evaluate step may take before it fails (its helper process is killed)."""
    eval_threads: int = 0
    """CPU threads llama.cpp uses to evaluate; 0 keeps llama.cpp's default."""
    max_plan_steps: int = 32
    """Most steps one plan may have; a longer plan is refused at creation."""
    stop_timeout_s: float = 10.0
    """Seconds `stop_all` waits for running steps to let go; steps still running after it are
    left as they are and resume at the next start."""

    def __post_init__(self) -> None:
        _require(1 <= self.max_active_goals <= 10_000, "max_active_goals", "must be in 1..10000")
        _require(bool(self.goal_store), "goal_store", "must not be empty")
        _require(1 <= self.max_open_goals <= 1_000_000, "max_open_goals", "must be in 1..1000000")
        _require(
            1 <= self.max_stored_goals <= 1_000_000, "max_stored_goals", "must be in 1..1000000"
        )
        _require(self.max_description_chars >= 1, "max_description_chars", "must be >= 1")
        _require(self.max_metadata_bytes >= 2, "max_metadata_bytes", "must be >= 2 bytes")
        _require(self.poll_interval_s > 0, "poll_interval_s", "must be > 0 seconds")
        _require(
            0 <= self.default_min_improvement < 1, "default_min_improvement", "must be in [0, 1)"
        )
        _require(
            self.legacy_job_type in ("lora", "fine_tune", "rlhf", "distillation"),
            "legacy_job_type",
            "one of lora, fine_tune, rlhf, distillation",
        )
        _require(self.eval_max_tokens >= 1, "eval_max_tokens", "must be >= 1")
        _require(self.eval_n_ctx >= 64, "eval_n_ctx", "must be >= 64 tokens")
        _require(self.eval_timeout_s > 0, "eval_timeout_s", "must be > 0 seconds")
        _require(self.eval_threads >= 0, "eval_threads", "must be >= 0")
        _require(1 <= self.max_plan_steps <= 1000, "max_plan_steps", "must be in 1..1000")
        _require(self.stop_timeout_s >= 0, "stop_timeout_s", "must be >= 0 seconds")

    def resolved(self, state_dir: str | Path) -> GoalsConfig:
        """Return a copy whose relative paths are made absolute under `state_dir`."""
        base = Path(state_dir)

        def absolute(p: str) -> str:
            return str(Path(p) if Path(p).is_absolute() else base / p)

        return replace(
            self,
            goal_store=absolute(self.goal_store),
            eval_dirs=tuple(absolute(d) for d in self.eval_dirs),
        )
