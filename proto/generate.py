"""Generate the ModelOps Python code (transports/grpc_gen/) from proto/modelops.proto.

    .venv/bin/python proto/generate.py            # rewrite the committed files (`make proto`)
    .venv/bin/python proto/generate.py --out DIR  # write them under DIR instead (the test does)

grpcio-tools' protoc writes modelops_pb2.py, its type stub modelops_pb2.pyi and
modelops_pb2_grpc.py. The proto is compiled as if it lived at transports/grpc_gen/modelops.proto
(protoc's virtual path), so the generated imports are package imports; the service and message
names stay unqualified (the proto has no package line), so the wire names are the legacy ones.
Each file gets `# mypy: ignore-errors` and `# ruff: noqa` first lines: protobuf and grpcio ship
no type hints, so generated code cannot pass `mypy --strict` (the .pyi still types the messages
for our code), and protoc's style is not ours.
tests/transports/test_grpc_stubs.py checks that the committed files equal a fresh generation.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto" / "modelops.proto"
PACKAGE_DIR = "transports/grpc_gen"
FILES = ("modelops_pb2.py", "modelops_pb2.pyi", "modelops_pb2_grpc.py")
HEADER = "# mypy: ignore-errors\n# ruff: noqa\n"


def generate(out: Path) -> list[Path]:
    """Write the generated files under `out`/transports/grpc_gen and return their paths."""
    target = out / PACKAGE_DIR
    target.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    code = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PACKAGE_DIR}={PROTO.parent}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            f"{PACKAGE_DIR}/{PROTO.name}",
        ]
    )
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    paths = [target / name for name in FILES]
    for path in paths:
        path.write_text(HEADER + path.read_text())
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="root to write under")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
