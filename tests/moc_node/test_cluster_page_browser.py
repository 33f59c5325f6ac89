"""The cluster page, opened in headless Chromium on a real 3-node loopback cluster, shows all 3.

Needs Debian's `chromium` (/usr/bin/chromium; `.ci/run` installs it); skipped with the reason
where it is absent. The screenshot is kept as `test-artifacts/cluster-page.png`.
"""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.moc_node.cluster_procs import (
    NAMES,
    NodeProc,
    alive,
    complete,
    start_cluster,
    wait_until,
)

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="Debian's chromium is not installed (/usr/bin/chromium absent)"
)


class Cards(HTMLParser):
    """Collect the member cards of the page: name -> state, and the model rows of each."""

    def __init__(self) -> None:
        super().__init__()
        self.states: dict[str, str] = {}
        self.models: dict[str, list[str]] = {}
        self.primary_badges = 0
        self.summary = ""
        self._card: str | None = None
        self._in_model_row = False
        self._cell = 0
        self._in_summary = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "section" and "member" in classes and a.get("data-name"):
            self._card = a["data-name"]
            assert self._card is not None
            self.states[self._card] = classes[1] if len(classes) > 1 else ""
            self.models[self._card] = []
        elif tag == "tr":
            self._in_model_row = "model" in classes
            self._cell = 0
        elif tag == "td" and self._in_model_row:
            self._cell += 1
        elif tag == "span" and "primary" in classes:
            self.primary_badges += 1
        elif tag == "div" and a.get("id") == "summary":
            self._in_summary = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "div":
            self._in_summary = False

    def handle_data(self, data: str) -> None:
        if self._in_summary:
            self.summary += data
        if self._in_model_row and self._cell == 1 and self._card is not None:
            self.models[self._card].append(data)


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium once with a fresh profile directory."""
    with tempfile.TemporaryDirectory(prefix="moc-chromium-") as profile:
        return subprocess.run(
            [str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[dict[str, NodeProc]]:
    with start_cluster(tmp_path) as nodes:
        yield nodes


def test_the_cluster_page_in_chromium_shows_all_three_members_and_the_primary(
    cluster: dict[str, NodeProc],
) -> None:
    a, b, c = (cluster[n] for n in NAMES)
    wait_until(
        lambda: all(alive(n.get("/cluster")) == set(NAMES) for n in (a, b, c)), 30, "3 alive"
    )
    wait_until(lambda: a.get("/cluster")["primary"] is not None, 30, "a primary")
    status, body = complete(a)  # places m on one node, so one card lists it
    assert status == 200, body
    wait_until(lambda: bool(a.get("/cluster")["models"].get("m")), 10, "m gossiped to node-a")
    view = a.get("/cluster")
    (holder,) = view["models"]["m"]

    url = a.url + "/"
    # Virtual time lets the page's fetch of /cluster and a few 1 s refreshes run, then dumps.
    dom = chromium("--virtual-time-budget=5000", "--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    cards = Cards()
    cards.feed(dom.stdout)
    assert cards.states == {n: "alive" for n in NAMES}, dom.stdout[-3000:]
    assert cards.models[holder] == ["m"]
    assert all(cards.models[n] == [] for n in NAMES if n != holder)
    assert cards.primary_badges == 1
    assert "3 member(s)" in cards.summary and f"primary {view['primary']['name']}" in cards.summary
    assert 'data-members="3"' in dom.stdout

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "cluster-page.png"
    shot.unlink(missing_ok=True)
    taken = chromium(
        "--virtual-time-budget=5000", f"--screenshot={shot}", "--window-size=1280,900", url
    )
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 10_000  # a rendered page, not a blank frame
