"""Operator API tokens and roles: every OperatorService call has a rule, and roles are enforced."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable

import grpc
import pytest

from edgefleet.orchestrator.security.auth import ROLE_BY_METHOD
from edgefleet.orchestrator.security.tokens import ROLES, role_allows
from edgefleet.v1 import operator_pb2
from tests.security.helpers import SecureOrchestrator
from tests.servers import STEP_TIMEOUT_S, OrchestratorThread

pytest_plugins = ["tests.servers", "tests.security.helpers"]

StartSecure = Callable[..., SecureOrchestrator]
SERVICE = operator_pb2.DESCRIPTOR.services_by_name["OperatorService"]


def test_roles_cover_every_rpc() -> None:
    methods = {method.name for method in SERVICE.methods}

    assert set(ROLE_BY_METHOD) == methods


def test_roles_are_known() -> None:
    assert set(ROLE_BY_METHOD.values()) <= set(ROLES)


@pytest.mark.parametrize(
    ("role", "required", "allowed"),
    [
        ("viewer", "viewer", True),
        ("viewer", "operator", False),
        ("operator", "operator", True),
        ("operator", "admin", False),
        ("admin", "viewer", True),
        ("admin", "admin", True),
        ("root", "viewer", False),
    ],
)
def test_role_allows(role: str, required: str, allowed: bool) -> None:
    assert role_allows(role, required) is allowed


def create_token(orchestrator: SecureOrchestrator, role: str) -> str:
    request = operator_pb2.CreateApiTokenRequest(name=f"{role}-bot", role=role)
    return orchestrator.operator().CreateApiToken(request, timeout=STEP_TIMEOUT_S).secret


def call_code(call: Callable[[], object]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_tokens_missing_rejected(start_secure: StartSecure) -> None:
    stub = start_secure().operator(token="")

    code = call_code(lambda: stub.ListDevices(operator_pb2.ListDevicesRequest(), timeout=STEP_TIMEOUT_S))

    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_tokens_unknown_rejected(start_secure: StartSecure) -> None:
    stub = start_secure().operator(token="efa_0000_not-a-token")

    code = call_code(lambda: stub.ListDevices(operator_pb2.ListDevicesRequest(), timeout=STEP_TIMEOUT_S))

    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_tokens_viewer_reads_only(start_secure: StartSecure) -> None:
    orchestrator = start_secure()
    viewer = orchestrator.operator(create_token(orchestrator, "viewer"))

    listed = call_code(lambda: viewer.ListDevices(operator_pb2.ListDevicesRequest(), timeout=STEP_TIMEOUT_S))
    deployed = call_code(
        lambda: viewer.Deploy(operator_pb2.DeployRequest(model_name="m", device_id="d"), timeout=STEP_TIMEOUT_S)
    )
    uploaded = call_code(lambda: viewer.UploadModel(iter([operator_pb2.UploadModelRequest()]), timeout=STEP_TIMEOUT_S))

    assert listed == grpc.StatusCode.OK
    assert deployed == grpc.StatusCode.PERMISSION_DENIED
    assert uploaded == grpc.StatusCode.PERMISSION_DENIED


def test_tokens_operator_not_admin(start_secure: StartSecure) -> None:
    orchestrator = start_secure()
    operator = orchestrator.operator(create_token(orchestrator, "operator"))

    # Deploy passes the role check and fails on the missing device instead.
    deployed = call_code(
        lambda: operator.Deploy(operator_pb2.DeployRequest(model_name="m", device_id="d"), timeout=STEP_TIMEOUT_S)
    )
    created = call_code(
        lambda: operator.CreateApiToken(
            operator_pb2.CreateApiTokenRequest(name="x", role="admin"), timeout=STEP_TIMEOUT_S
        )
    )

    assert deployed == grpc.StatusCode.NOT_FOUND
    assert created == grpc.StatusCode.PERMISSION_DENIED


def test_tokens_revoked_rejected(start_secure: StartSecure) -> None:
    orchestrator = start_secure()
    admin = orchestrator.operator()
    created = admin.CreateApiToken(operator_pb2.CreateApiTokenRequest(name="ci", role="viewer"), timeout=STEP_TIMEOUT_S)
    viewer = orchestrator.operator(created.secret)
    viewer.ListDevices(operator_pb2.ListDevicesRequest(), timeout=STEP_TIMEOUT_S)

    revoked = admin.RevokeApiToken(
        operator_pb2.RevokeApiTokenRequest(token_id=created.token.token_id), timeout=STEP_TIMEOUT_S
    )
    code = call_code(lambda: viewer.ListDevices(operator_pb2.ListDevicesRequest(), timeout=STEP_TIMEOUT_S))

    assert revoked.HasField("revoked_at")
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_last_admin_token_kept(start_secure: StartSecure) -> None:
    orchestrator = start_secure()
    admin = orchestrator.operator()
    tokens = admin.ListApiTokens(operator_pb2.ListApiTokensRequest(), timeout=STEP_TIMEOUT_S).tokens
    bootstrap = tokens[0].token_id

    with pytest.raises(grpc.RpcError) as refused:
        admin.RevokeApiToken(operator_pb2.RevokeApiTokenRequest(token_id=bootstrap), timeout=STEP_TIMEOUT_S)
    second = admin.CreateApiToken(
        operator_pb2.CreateApiTokenRequest(name="alice", role="admin"), timeout=STEP_TIMEOUT_S
    )
    revoked = admin.RevokeApiToken(operator_pb2.RevokeApiTokenRequest(token_id=bootstrap), timeout=STEP_TIMEOUT_S)
    alice = orchestrator.operator(second.secret)
    with pytest.raises(grpc.RpcError) as self_revoke:
        alice.RevokeApiToken(operator_pb2.RevokeApiTokenRequest(token_id=second.token.token_id), timeout=STEP_TIMEOUT_S)

    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "only active admin token" in (refused.value.details() or "")
    assert revoked.HasField("revoked_at")
    assert self_revoke.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_tokens_list_hides_secrets(start_secure: StartSecure) -> None:
    orchestrator = start_secure()
    secret = create_token(orchestrator, "viewer")

    listed = orchestrator.operator().ListApiTokens(operator_pb2.ListApiTokensRequest(), timeout=STEP_TIMEOUT_S)

    assert [t.role for t in listed.tokens] == ["admin", "viewer"]
    assert secret not in str(listed)


def test_bootstrap_token_file(start_secure: StartSecure) -> None:
    orchestrator = start_secure()
    path = orchestrator.server.config.data_dir / "admin.token"

    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert orchestrator.admin_token.startswith("efa_")


def test_bootstrap_token_once(start_secure: StartSecure) -> None:
    first = start_secure()
    token = first.admin_token
    first.server.stop()

    second = start_secure()

    assert second.admin_token == token


def test_insecure_without_token_is_admin(start_orchestrator: Callable[..., OrchestratorThread]) -> None:
    orchestrator = start_orchestrator()
    request = operator_pb2.CreateApiTokenRequest(name="ci", role="viewer")

    created = orchestrator.operator.CreateApiToken(request, timeout=STEP_TIMEOUT_S)

    assert created.secret.startswith("efa_")
