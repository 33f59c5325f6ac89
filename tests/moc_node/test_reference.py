from __future__ import annotations

from pathlib import Path

from moc_node.reference import BEGIN, field_docs, render, splice
from transports.config import ServerConfig

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_holds_the_current_configuration_reference() -> None:
    text = README.read_text()
    assert BEGIN in text
    assert splice(text) == text, "run: python -m moc_node.reference --write"


def test_every_config_field_is_documented() -> None:
    reference = render()
    assert "| `zmq_port` | `int` | `7211` |" in reference
    assert "(gethostname())" in reference
    for line in reference.splitlines():
        if line.startswith("| `"):
            assert not line.rstrip().endswith("|  |"), f"undocumented: {line}"


def test_field_docs_reads_attribute_docstrings() -> None:
    assert "legacy" in field_docs(ServerConfig)["zmq_port"]
