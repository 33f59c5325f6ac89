"""The import graph keeps its layers and rooms, and has no circle.

Read with `ast`, importing nothing: every `import` and `from ... import` of every module in the four
packages counts, those inside functions and under TYPE_CHECKING too (a circle drawn for the type
checker is still a circle for the reader).

Layers: moc_node (the program) > transports > actors, cluster; nothing imports upwards, and actors
and cluster never import each other (moc_node wires them). Rooms inside actors: see ROOM_MAY_IMPORT.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("moc_node", "transports", "actors", "cluster")
LAYER = {"moc_node": 3, "transports": 2, "actors": 1, "cluster": 1}
ROOMS = ("serving", "worker", "learning", "goals")
# "top" is actors' shared modules (errors, types, names, gguf_synth, the package itself).
ROOM_MAY_IMPORT = {
    "top": {"top"},
    "worker": {"top", "worker"},
    "serving": {"top", "worker", "serving"},
    "learning": {"top", "learning"},
    "goals": {"top", "goals"},
}
# Single module edges across rooms, each the one helper it names.
ALLOWED_CROSSINGS = {
    # GoalScorer loads the model with the worker's own llama.cpp settings (open_llama).
    ("actors.goals.scoring", "actors.worker.backends.gguf"),
    # read_gguf_header, to check a job's base model before it is queued.
    ("actors.learning.actor", "actors.serving.estimate"),
    # describe_exit, to name how a job's child process died.
    ("actors.learning.job_supervisor", "actors.worker.client"),
}
# Issue 14 fixes these; take each off the list when it is gone (the last test below insists).
KNOWN_CYCLES: list[frozenset[str]] = []


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the four packages by dotted name (a package by its `__init__`)."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        if not (root / package).is_dir():
            continue
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _resolve(name: str, known: Iterable[str]) -> str | None:
    """The known module `name` means, walking up to its nearest known package."""
    known = set(known)
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of the four packages that module `name` imports."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from a import b` names module a.b when there is one, else something in a.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            if target.split(".")[0] in PACKAGES:
                resolved = _resolve(target, known)
                if resolved is not None and resolved != name:
                    found.add(resolved)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = modules(root)
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in ROOMS else "top"


def forbidden_edges(graph: Mapping[str, Iterable[str]]) -> list[str]:
    """Each edge that breaks a layer or a room rule, as "a -> b (why)"."""
    bad: list[str] = []
    for source, targets in graph.items():
        src_pkg = source.split(".")[0]
        for target in targets:
            dst_pkg = target.split(".")[0]
            if LAYER[dst_pkg] > LAYER[src_pkg]:
                bad.append(f"{source} -> {target} (imports upwards)")
            elif src_pkg != dst_pkg and LAYER[dst_pkg] == LAYER[src_pkg]:
                bad.append(f"{source} -> {target} (actors and cluster are wired by moc_node)")
            elif src_pkg == dst_pkg == "actors":
                allowed = ROOM_MAY_IMPORT[room(source)]
                if room(target) not in allowed and (source, target) not in ALLOWED_CROSSINGS:
                    bad.append(f"{source} -> {target} ({room(source)} may not import {room(target)})")
    return sorted(bad)


def cycles(graph: Mapping[str, Iterable[str]]) -> list[frozenset[str]]:
    """The strongly connected sets of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_upwards_across_actors_and_cluster_or_between_rooms() -> None:
    assert forbidden_edges(import_graph()) == []


def test_the_import_graph_has_no_circle_but_the_known_one() -> None:
    unexpected = [sorted(c) for c in cycles(import_graph()) if c not in KNOWN_CYCLES]
    assert unexpected == []


def test_a_known_circle_that_is_gone_is_taken_off_the_list() -> None:
    present = set(cycles(import_graph()))
    assert [sorted(c) for c in KNOWN_CYCLES if c not in present] == []


def test_the_rules_catch_each_kind_of_forbidden_edge() -> None:
    graph = {
        "cluster.runner": {"transports.peer", "actors.errors"},
        "transports.http": {"moc_node.node"},
        "actors.worker.client": {"actors.serving.lane"},
        "actors.learning.jobs": {"actors.goals.plan", "actors.errors"},
        "actors.errors": {"actors.worker.protocol"},
        "actors.serving.lane": {"actors.worker.client", "actors.types"},
        "moc_node.node": {"transports.http", "cluster.runner", "actors.serving.lane"},
    }
    assert forbidden_edges(graph) == [
        "actors.errors -> actors.worker.protocol (top may not import worker)",
        "actors.learning.jobs -> actors.goals.plan (learning may not import goals)",
        "actors.worker.client -> actors.serving.lane (worker may not import serving)",
        "cluster.runner -> actors.errors (actors and cluster are wired by moc_node)",
        "cluster.runner -> transports.peer (imports upwards)",
        "transports.http -> moc_node.node (imports upwards)",
    ]


def test_a_circle_of_three_modules_is_found() -> None:
    graph = {"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}, "a.w": {"a.x"}}
    assert cycles(graph) == [frozenset({"a.x", "a.y", "a.z"})]


def test_a_relative_import_resolves_to_the_module_it_names(tmp_path: Path) -> None:
    (tmp_path / "actors" / "worker").mkdir(parents=True)
    (tmp_path / "actors" / "__init__.py").write_text("")
    (tmp_path / "actors" / "worker" / "__init__.py").write_text("")
    (tmp_path / "actors" / "worker" / "client.py").write_text("from . import protocol\n")
    (tmp_path / "actors" / "worker" / "protocol.py").write_text("from ..types import X\n")
    (tmp_path / "actors" / "types.py").write_text("X = 1\n")
    graph = import_graph(tmp_path)
    assert graph["actors.worker.client"] == {"actors.worker.protocol"}
    assert graph["actors.worker.protocol"] == {"actors.types"}
