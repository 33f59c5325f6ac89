from __future__ import annotations

import pytest

from actors.worker.backends.threads import count_cores, physical_cores

CASES = [
    ("two cores without hyperthreads", [0, 1], {0: "0\n", 1: "1\n"}, 2),
    ("two hyperthreaded cores", [0, 1, 2, 3], {0: "0,2\n", 1: "1,3\n", 2: "0,2\n", 3: "1,3\n"}, 2),
    ("an affinity mask of one core's two siblings", [0, 2], {0: "0,2", 2: "0,2"}, 1),
    ("unreadable topology counts each CPU", [0, 1, 2], {}, 3),
    ("no CPU at all still gives one thread", [], {}, 1),
]


@pytest.mark.parametrize(
    ("cpus", "siblings", "cores"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_physical_cores_are_counted_as_llama_cpp_counts_them(
    cpus: list[int], siblings: dict[int, str], cores: int
) -> None:
    assert count_cores(cpus, siblings.get) == cores


def test_this_host_has_at_least_one_core_and_no_more_than_its_cpus() -> None:
    import os

    assert 1 <= physical_cores() <= (os.cpu_count() or 1)
