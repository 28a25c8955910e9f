"""The committed gRPC stubs are what `make proto` generates from proto/herd/v1/herd.proto."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_stubs_are_current(tmp_path):
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Ideployments/pb=proto/herd/v1",
                    f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}",
                    "proto/herd/v1/herd.proto"], cwd=ROOT, check=True)
    for name in ("herd_pb2.py", "herd_pb2.pyi", "herd_pb2_grpc.py"):
        generated = (tmp_path / "deployments" / "pb" / name).read_text()
        assert generated == (ROOT / "deployments" / "pb" / name).read_text(), f"{name} is stale: run make proto"
