"""A bootstrap admin token survives an orchestrator that starts on another database in its data directory."""

from __future__ import annotations

from pathlib import Path

import grpc

from edgefleet.v1 import operator_pb2, operator_pb2_grpc
from tests.faults.processes import OrchestratorProcess


def list_tokens_code(address: str, token: str) -> grpc.StatusCode:
    """Call ListApiTokens with token; return OK or the error's status code."""
    with grpc.insecure_channel(address) as channel:
        stub = operator_pb2_grpc.OperatorServiceStub(channel)
        try:
            stub.ListApiTokens(
                operator_pb2.ListApiTokensRequest(), metadata=[("authorization", f"Bearer {token}")], timeout=30
            )
        except grpc.RpcError as error:
            return error.code()
    return grpc.StatusCode.OK


def test_bootstrap_token_of_other_database_kept(tmp_path: Path) -> None:
    first_db = f"sqlite:///{tmp_path / 'first.db'}"
    second_db = f"sqlite:///{tmp_path / 'second.db'}"

    first = OrchestratorProcess(tmp_path, "--db", first_db)
    first.start()
    first.stop()
    token_file = first.data_dir / "admin.token"
    first_token = token_file.read_text().strip()

    second = OrchestratorProcess(tmp_path, "--db", second_db)
    second.start()
    try:
        second_token = token_file.read_text().strip()
        assert second_token != first_token
        assert list_tokens_code(second.address, second_token) == grpc.StatusCode.OK
    finally:
        second.stop()
    kept = list(first.data_dir.glob("admin.token.replaced-*"))
    assert len(kept) == 1
    assert kept[0].read_text().strip() == first_token
    assert kept[0].stat().st_mode & 0o777 == 0o600
    assert "moved it to" in second.log_tail(100)

    first.start()
    try:
        assert list_tokens_code(first.address, first_token) == grpc.StatusCode.OK
        assert list_tokens_code(first.address, second_token) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        first.stop()
