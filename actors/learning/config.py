"""Configuration of learning jobs: the TOML section [learning]."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path


def _require(cond: bool, key: str, reason: str) -> None:
    if not cond:
        raise ValueError(f"{key}: {reason}")


@dataclass(frozen=True, slots=True)
class LearningConfig:
    """[learning]: where jobs, datasets and results live, and how many jobs run at once."""

    max_parallel_jobs: int = 2
    """Jobs trained at the same time (legacy default 2). Each runs in a process of its own
    (torch threads each, see `torch_threads`); more jobs finish sooner only when the device
    has room."""
    max_queued_jobs: int = 100
    """Jobs waiting to run (queued, not running); one more is refused with 429
    (`too_many_jobs`, Retry-After 60 s) until the queue moves. Jobs run `max_parallel_jobs`
    at a time for minutes to hours each, so a hundred waiting is days of work; a longer queue
    only parks specs. A goal's train step that meets the limit fails with this refusal."""
    max_stored_jobs: int = 1000
    """Jobs kept in the store, finished ones included with their loss histories (a row per
    step). Retention: at the cap, the oldest finished jobs (completed, failed, cancelled) are
    deleted to make room for a new one; the models they registered stay registered and their
    files stay. When no stored job is finished, a new one is refused with 507
    (`job_store_full`): keep it above `max_queued_jobs + max_parallel_jobs`."""
    job_store: str = "learning/jobs.db"
    """SQLite file (WAL) holding every job, its progress and loss history. A relative path is
    resolved against `node.state_dir` (see `resolved`)."""
    dataset_dirs: tuple[str, ...] = ()
    """Directories datasets may be read from; a `dataset_path` outside them is refused, so a
    client cannot make the node read arbitrary files. Empty = no dataset is allowed."""
    output_dir: str = "learning/outputs"
    """Where adapters and fine-tuned models are written (`<output_name>.gguf`) and where each
    job keeps its checkpoints (`checkpoints/<job id>/`); relative to `node.state_dir`."""
    checkpoint_every: int = 50
    """Steps between checkpoints. A restart resumes from the last one, so smaller loses less
    work to a crash, at the cost of writing the trainable weights and optimizer state each time
    (the whole model for fine_tune and distillation)."""
    memory_wait_s: float = 600.0
    """Seconds a job waits for its memory claim on the device before it fails with a clear
    error. Serving models keep their memory; training waits rather than evicting them."""
    retry_interval_s: float = 1.0
    """Seconds between attempts to claim memory for a waiting job."""
    stop_grace_s: float = 15.0
    """Seconds a job's process has to stop after a cancel or a node shutdown (it stops before
    its next optimizer step) before it is killed. Longer than one step of the largest job, or
    a slow step is killed; a kill loses at most the steps since the last checkpoint."""
    torch_threads: int = 0
    """CPU threads torch uses in each job's process; 0 keeps torch's default (the physical cores).
    Fixing it also fixes the summation order, which makes resumed runs bit-identical."""
    default_steps: int = 100
    """Optimizer steps of a job whose `training_params` give no `steps`."""
    max_steps: int = 100_000
    """Upper bound on `training_params.steps`, so a typo cannot occupy the node for weeks."""

    def __post_init__(self) -> None:
        _require(1 <= self.max_parallel_jobs <= 64, "max_parallel_jobs", "must be in 1..64")
        _require(bool(self.job_store), "job_store", "must not be empty")
        _require(
            1 <= self.max_queued_jobs <= 1_000_000, "max_queued_jobs", "must be in 1..1000000"
        )
        _require(
            1 <= self.max_stored_jobs <= 1_000_000, "max_stored_jobs", "must be in 1..1000000"
        )
        _require(bool(self.output_dir), "output_dir", "must not be empty")
        _require(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1 step")
        _require(self.memory_wait_s >= 0, "memory_wait_s", "must be >= 0 seconds")
        _require(self.retry_interval_s > 0, "retry_interval_s", "must be > 0 seconds")
        _require(self.stop_grace_s >= 0, "stop_grace_s", "must be >= 0 seconds")
        _require(self.torch_threads >= 0, "torch_threads", "must be >= 0")
        _require(
            1 <= self.default_steps <= self.max_steps, "default_steps", "must be in 1..max_steps"
        )

    def resolved(self, state_dir: str | Path) -> LearningConfig:
        """Return a copy whose relative paths are made absolute under `state_dir`."""
        base = Path(state_dir)

        def absolute(p: str) -> str:
            return str(Path(p) if Path(p).is_absolute() else base / p)

        return replace(
            self,
            job_store=absolute(self.job_store),
            output_dir=absolute(self.output_dir),
            dataset_dirs=tuple(absolute(d) for d in self.dataset_dirs),
        )
