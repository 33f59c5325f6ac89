"""The live cluster, started once for the package's tests (each takes a few seconds to start)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.live_cluster import Cluster, live_cluster


@pytest.fixture(scope="package")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three members that see each other, with model "m" placed on one of them."""
    with live_cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c
