import importlib.util
import pathlib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
COMMITTED = REPO_ROOT / "serve" / "proto"


def _load_generator():
    spec = importlib.util.spec_from_file_location("protos_generate", REPO_ROOT / "protos" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_codegen(tmp_path):
    written = _load_generator().generate(tmp_path)

    fresh = {path.relative_to(tmp_path) for path in written}
    committed = {path.relative_to(COMMITTED) for path in COMMITTED.rglob("*.py*") if "__pycache__" not in path.parts}
    assert fresh == committed, "serve/proto/ differs from a fresh `python protos/generate.py`; rerun it"
    for relative in sorted(fresh):
        assert (tmp_path / relative).read_text() == (COMMITTED / relative).read_text(), (
            f"serve/proto/{relative} is stale; rerun `python protos/generate.py`"
        )


def test_stub_imports_name_serve_package():
    grpc_stub = (COMMITTED / "jamba" / "v1" / "jamba_pb2_grpc.py").read_text()
    assert "from serve.proto.jamba.v1 import jamba_pb2" in grpc_stub
    assert "from jamba.v1" not in grpc_stub


def test_descriptor_keeps_proto_path():
    from serve.proto.jamba.v1 import jamba_pb2

    assert jamba_pb2.DESCRIPTOR.name == "jamba/v1/jamba.proto"
    assert jamba_pb2.DESCRIPTOR.package == "jamba.v1"
    assert set(jamba_pb2.DESCRIPTOR.services_by_name["JambaService"].methods_by_name) == {
        "Generate", "GenerateStream", "GetModelInfo", "Tokenize",
    }
