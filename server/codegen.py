"""Regenerate the Python gRPC code from proto/ (``python -m server.codegen``; ``make proto``).

Generated modules live in ``server/qwen3guard/`` (``v1/`` for the guard, ``embedding/v1/`` and
``rerank/v1/`` for the retrieval services). protoc writes absolute imports
(``from qwen3guard.v1 import ...``); they are rewritten to ``server.qwen3guard.v1`` so the code
imports as part of this package. A test regenerates into a temporary folder and fails when the
committed files are stale.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
PROTO_FILES = (
    "qwen3guard/v1/guard.proto",
    "qwen3guard/embedding/v1/embedding.proto",
    "qwen3guard/rerank/v1/rerank.proto",
    "qwen3guard/media/v1/media.proto",
    "qwen3guard/reasoning/v1/reasoning.proto",
    "qwen3guard/parscale/v1/parscale.proto",
)
PACKAGE_PREFIX = "server."


def generate(out_root: Path) -> list[Path]:
    """Generate into ``out_root`` (a folder standing for ``server/``); return the files written."""
    out_root.mkdir(parents=True, exist_ok=True)
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *PROTO_FILES,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    written = []
    for proto in PROTO_FILES:
        package_dir = out_root / Path(proto).parent
        current = out_root  # make every generated folder an importable package
        for part in Path(proto).parent.parts:
            current = current / part
            init = current / "__init__.py"
            if not init.exists():
                init.write_text('"""Generated gRPC code (python -m server.codegen)."""\n')
            written.append(init)
        for file in sorted(package_dir.glob(Path(proto).stem + "_pb2*")):
            text = file.read_text()
            text = re.sub(r"^from qwen3guard\.", f"from {PACKAGE_PREFIX}qwen3guard.", text, flags=re.M)
            file.write_text(text)
            written.append(file)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(ROOT / "server"), help="folder standing for the server package")
    args = parser.parse_args(argv)
    for path in generate(Path(args.out)):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
