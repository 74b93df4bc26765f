"""Regenerate the Python code for protos/ into edgefleet/v1/, or check that it is up to date."""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE = Path("edgefleet") / "v1"
INIT_TEXT = '"""Generated gRPC and protobuf code for the edgefleet.v1 API. Regenerate with `make protos`."""\n'


def generate(out_root: Path) -> list[Path]:
    """Run protoc for every .proto file and return the generated files relative to out_root."""
    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE).glob("*.proto"))
    if not sources:
        raise SystemExit(f"no .proto files found under {PROTO_ROOT / PACKAGE}")
    include = str(Path(protoc.__file__).parent / "_proto")
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the messages above")
    (out_root / PACKAGE / "__init__.py").write_text(INIT_TEXT)
    (out_root / PACKAGE / "py.typed").write_text("")
    return sorted(p.relative_to(out_root) for p in (out_root / PACKAGE).iterdir() if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed code differs")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out_root = Path(tmp)
        generated = generate(out_root)
        target = ROOT / PACKAGE
        if options.check:
            committed = sorted(
                p.relative_to(ROOT) for p in target.iterdir() if p.is_file() and p.suffix in {".py", ".pyi", ".typed"}
            )
            stale = [
                str(p)
                for p in generated
                if not (ROOT / p).exists() or not filecmp.cmp(out_root / p, ROOT / p, shallow=False)
            ]
            extra = [str(p) for p in committed if p not in generated]
            if stale or extra:
                print("generated code is out of date; run `make protos`:", *stale, *extra, file=sys.stderr)
                return 1
            print(f"{len(generated)} generated files are up to date")
            return 0
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for path in generated:
            shutil.copy2(out_root / path, ROOT / path)
        print(f"wrote {len(generated)} files to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
