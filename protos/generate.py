"""Generate the Python gRPC stubs of protos/jamba/v1/*.proto into serve/proto/.

Run from anywhere with the dev dependencies installed (grpcio-tools):

    python protos/generate.py

The stubs are committed, and tests/serve/test_proto.py fails when they differ from a fresh run, so rerun this
after every change to a .proto file. protoc writes imports relative to the proto root (`from jamba.v1 import ...`),
which would resolve to the model package `jamba`, so they are rewritten to `serve.proto.jamba.v1`.
"""

import argparse
import pathlib
import re
import sys

PROTO_ROOT = pathlib.Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent
DEFAULT_OUT = REPO_ROOT / "serve" / "proto"
PACKAGE_PREFIX = "serve.proto."
PROTO_PACKAGES = ("jamba",)


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Run protoc on every .proto under protos/ into out_dir and return the files written."""
    from grpc_tools import protoc
    import importlib.resources

    protos = sorted(str(path.relative_to(PROTO_ROOT)) for path in PROTO_ROOT.rglob("*.proto"))
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    status = protoc.main(argv)
    if status != 0:
        raise RuntimeError(f"protoc failed with exit status {status}: {' '.join(argv)}")

    written = []
    import_pattern = re.compile(rf"^(from|import) ({'|'.join(PROTO_PACKAGES)})([.\s])", re.MULTILINE)
    for path in sorted(out_dir.rglob("*.py*")):
        if not path.name.endswith(("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")):
            continue
        text = import_pattern.sub(rf"\1 {PACKAGE_PREFIX}\2\3", path.read_text())
        # The module name given to the message classes, so that pickle (Ray passes requests between processes)
        # imports them from where they are.
        module_pattern = re.compile(rf"BuildTopDescriptorsAndMessages\(DESCRIPTOR, '({'|'.join(PROTO_PACKAGES)})\.")
        text = module_pattern.sub(rf"BuildTopDescriptorsAndMessages(DESCRIPTOR, '{PACKAGE_PREFIX}\1.", text)
        path.write_text(text)
        written.append(path)

    # Every directory between out_dir and a stub becomes a package.
    for path in written:
        for package in path.relative_to(out_dir).parents:
            init = out_dir / package / "__init__.py"
            if not init.exists():
                init.write_text("")
                written.append(init)
    return sorted(written)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="output directory (default: serve/proto)")
    args = parser.parse_args()
    for path in generate(args.out):
        print(path)


if __name__ == "__main__":
    sys.exit(main())
