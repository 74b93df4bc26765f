"""`edgefleet keys` output when the orchestrator runs an earlier release that does not count trusting devices."""

from __future__ import annotations

from typing import Any

from google.protobuf.message import Message

from edgefleet.cli.tokens import _keys_result, render_keys
from edgefleet.v1 import common_pb2, operator_pb2

KEY = operator_pb2.SigningKeyInfo(key_id="0123456789abcdef", public_key=b"\x01" * 32, active=True)


class RecordedClient:
    """Returns recorded responses by method name, as an orchestrator of an earlier release sent them."""

    def __init__(self, responses: dict[str, Message]) -> None:
        self.responses = responses
        self.calls: list[str] = []

    def call(self, method: str, request: Any) -> Any:
        self.calls.append(method)
        return self.responses[method]


def test_earlier_orchestrator_count_shown_unknown() -> None:
    # An earlier release sets neither devices nor trusted_by, so both read 0.
    keys = operator_pb2.ListSigningKeysResponse(keys=[KEY], key_set_version=3)
    device = operator_pb2.Device(device_id="cam-1", status=common_pb2.DEVICE_STATUS_ONLINE)
    client = RecordedClient({"ListDevices": operator_pb2.ListDevicesResponse(devices=[device])})

    view = _keys_result(client, keys)  # type: ignore[arg-type]
    text = render_keys(view)

    assert view["devices"] is None
    assert view["keys"][0]["trusted_by"] is None
    assert "0 of 0" not in text
    assert "it runs an earlier release than this CLI" in text


def test_empty_fleet_count_shown_zero() -> None:
    keys = operator_pb2.ListSigningKeysResponse(keys=[KEY], key_set_version=1)
    client = RecordedClient({"ListDevices": operator_pb2.ListDevicesResponse()})

    view = _keys_result(client, keys)  # type: ignore[arg-type]

    assert view["devices"] == 0
    assert "0 of 0" in render_keys(view)
    assert "earlier release" not in render_keys(view)
