"""The job process's command-line contract: the job argument round-trips, errors are described."""

from __future__ import annotations

from pathlib import Path

from actors.errors import ModelNotFound
from actors.learning.config import LearningConfig
from actors.learning.job_process import decode_job, describe_error, encode_job


def test_a_job_argument_round_trips_the_config_and_the_model_files() -> None:
    config = LearningConfig(
        job_store="/s/jobs.db", dataset_dirs=("/d1", "/d2"), torch_threads=3, stop_grace_s=2.5
    )
    models = {"tiny": Path("/m/tiny.gguf"), "teacher": Path("/m/t.gguf")}
    assert decode_job(encode_job("j1", config, models)) == ("j1", config, models)


def test_errors_are_described_by_their_own_message_or_by_their_type() -> None:
    assert describe_error(ModelNotFound("no model x")) == "no model x"
    assert describe_error(ValueError("bad")) == "ValueError: bad"
