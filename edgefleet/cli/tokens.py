"""edgefleet enroll, tokens, keys, devices revoke and devices remove: the admin commands of the orchestrator."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from google.protobuf.timestamp_pb2 import Timestamp

from edgefleet.cli import views
from edgefleet.v1 import operator_pb2

if TYPE_CHECKING:
    from edgefleet.cli.main import Client

OutputFlag = Callable[[argparse.ArgumentParser], None]
ROLES = ("viewer", "operator", "admin")
# The orchestrator's rule for device ids (ID_PATTERN in edgefleet.orchestrator.validation).
DEVICE_ID_RULE = "1 to 63 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit"


# The orchestrator's longest enrollment token validity (edgefleet.orchestrator.security.tokens.MAX_ENROLLMENT_TTL),
# checked here too so that a huge --ttl is a usage error and not a protobuf overflow.
MAX_ENROLLMENT_TTL_DAYS = 30


def parse_ttl(value: str) -> int:
    """Parse a duration such as 30m, 24h or 7d into seconds; raise ArgumentTypeError for anything else."""
    match = re.fullmatch(r"(\d+)([smhd])", value)
    if not match or int(match.group(1)) == 0:
        raise argparse.ArgumentTypeError(f"invalid duration {value!r}: use a positive number with s, m, h or d (24h)")
    seconds = int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    if seconds > MAX_ENROLLMENT_TTL_DAYS * 86400:
        raise argparse.ArgumentTypeError(
            f"invalid duration {value!r}: an enrollment token is valid for at most {MAX_ENROLLMENT_TTL_DAYS} days "
            f"(--ttl {MAX_ENROLLMENT_TTL_DAYS}d)"
        )
    return seconds


def add_device_commands(devices: argparse._SubParsersAction[argparse.ArgumentParser], output_flag: OutputFlag) -> None:
    sub = devices.add_parser("revoke", help="revoke a device: close its stream and refuse its next connection (admin)")
    sub.add_argument("device_id")
    sub.add_argument("--reason", default="", help="why, for the orchestrator's log")
    output_flag(sub)
    sub.set_defaults(handler=cmd_devices_revoke)
    sub = devices.add_parser(
        "remove",
        help="remove a device that is gone for good: its record, state and credentials; its metrics stay (admin)",
    )
    sub.add_argument("device_id")
    sub.add_argument("--force", action="store_true", help="remove it although a rollout in progress includes it")
    output_flag(sub)
    sub.set_defaults(handler=cmd_devices_remove)


def add_commands(nouns: argparse._SubParsersAction[argparse.ArgumentParser], output_flag: OutputFlag) -> None:
    enroll = nouns.add_parser("enroll", help="create, list and revoke enrollment tokens for devices (admin)")
    verbs = enroll.add_subparsers(dest="verb", required=True)
    sub = verbs.add_parser("create", help="create a single-use enrollment token for one device id")
    sub.add_argument(
        "--device-id",
        required=True,
        help=f"device id that the token lets an agent enroll as (the id in its certificate): {DEVICE_ID_RULE}",
    )
    sub.add_argument(
        "--ttl",
        type=parse_ttl,
        default=24 * 3600,
        help=f"validity: 30m, 24h, 7d, at most {MAX_ENROLLMENT_TTL_DAYS}d (default 24h)",
    )
    output_flag(sub)
    sub.set_defaults(handler=cmd_enroll_create)
    sub = verbs.add_parser("list", help="list enrollment tokens with their state (never their secrets)")
    sub.add_argument("--device-id", default="", help="only the tokens of this device")
    output_flag(sub)
    sub.set_defaults(handler=cmd_enroll_list)
    sub = verbs.add_parser("revoke", help="delete an unused enrollment token by id, so that no device enrolls with it")
    sub.add_argument("token_id")
    output_flag(sub)
    sub.set_defaults(handler=cmd_enroll_revoke)

    tokens = nouns.add_parser("tokens", help="create, list and revoke operator API tokens (admin)")
    verbs = tokens.add_subparsers(dest="verb", required=True)
    sub = verbs.add_parser("create", help="create an API token; its secret is printed once")
    sub.add_argument(
        "--name",
        required=True,
        help="who or what uses the token: 1 to 64 ASCII letters, digits, '.', '_', '@' or '-', "
        "starting with a letter or digit",
    )
    sub.add_argument("--role", required=True, choices=ROLES, help="viewer reads, operator deploys, admin manages")
    output_flag(sub)
    sub.set_defaults(handler=cmd_tokens_create)
    sub = verbs.add_parser("list", help="list API tokens (never their secrets)")
    output_flag(sub)
    sub.set_defaults(handler=cmd_tokens_list)
    sub = verbs.add_parser("revoke", help="revoke an API token by id")
    sub.add_argument("token_id")
    output_flag(sub)
    sub.set_defaults(handler=cmd_tokens_revoke)

    keys = nouns.add_parser("keys", help="list, rotate and retire artifact signing keys (admin)")
    verbs = keys.add_subparsers(dest="verb", required=True)
    sub = verbs.add_parser("list", help="list the signing keys; the active one signs new assignments")
    output_flag(sub)
    sub.set_defaults(handler=cmd_keys_list)
    sub = verbs.add_parser("rotate", help="add a signing key and sign with it from now on")
    output_flag(sub)
    sub.set_defaults(handler=cmd_keys_rotate)
    sub = verbs.add_parser("retire", help="remove an old key from the set that devices trust")
    sub.add_argument("key_id")
    sub.add_argument(
        "--force",
        action="store_true",
        help="retire even when some devices have reported none of the keys that stay; enroll again each device "
        "that then rejects the new key set",
    )
    output_flag(sub)
    sub.set_defaults(handler=cmd_keys_retire)


def _emit(data: Any, output: str, render: Callable[[Any], str]) -> None:
    from edgefleet.cli.main import emit

    emit(data, output, render)


def cmd_devices_revoke(client: Client, args: argparse.Namespace) -> None:
    response = client.call(
        "RevokeDevice", operator_pb2.RevokeDeviceRequest(device_id=args.device_id, reason=args.reason)
    )
    result = {"device_id": response.device_id, "stream_closed": response.stream_closed}
    _emit(
        result,
        args.output,
        lambda r: f"revoked {r['device_id']}" + ("; closed its stream" if r["stream_closed"] else ""),
    )


def cmd_devices_remove(client: Client, args: argparse.Namespace) -> None:
    response = client.call("RemoveDevice", operator_pb2.RemoveDeviceRequest(device_id=args.device_id, force=args.force))
    result = {
        "device_id": response.device_id,
        "removed_at": _time_text(response.removed_at),
        "stream_closed": response.stream_closed,
        "rollout_ids": list(response.rollout_ids),
    }
    _emit(result, args.output, _render_removal)


def _render_removal(result: dict[str, Any]) -> str:
    text = f"removed {result['device_id']}"
    if result["stream_closed"]:
        text += "; closed its stream"
    if result["rollout_ids"]:
        text += f"; rollouts {', '.join(result['rollout_ids'])} go on without it"
    return text


def cmd_enroll_create(client: Client, args: argparse.Namespace) -> None:
    response = client.call(
        "CreateEnrollmentToken",
        operator_pb2.CreateEnrollmentTokenRequest(device_id=args.device_id, ttl_seconds=args.ttl),
    )
    # The keys of `enroll list`, plus the secret, which only this reply carries.
    created = operator_pb2.EnrollmentToken(
        token_id=response.token_id,
        device_id=response.device_id,
        created_at=response.created_at,
        expires_at=response.expires_at,
    )
    result = {**enrollment_token_view(created, datetime.now(UTC)), "token": response.token}
    _emit(
        result,
        args.output,
        lambda r: (
            f"{r['token']}\n(token {r['token_id']}, single use, for device {r['device_id']}, expires "
            f"{r['expires_at']}; pass it to the agent as --enrollment-token)"
        ),
    )


def enrollment_token_view(token: operator_pb2.EnrollmentToken, now: datetime) -> dict[str, Any]:
    used = token.HasField("used_at")
    if used:
        state = "used"
    elif token.expires_at.ToDatetime(tzinfo=UTC) <= now:
        state = "expired"
    else:
        state = "unused"
    return {
        "token_id": token.token_id,
        "device_id": token.device_id,
        "state": state,
        "created_at": _time_text(token.created_at),
        "expires_at": _time_text(token.expires_at),
        "used_at": _time_text(token.used_at) if used else None,
    }


def render_enrollment_tokens(tokens: list[dict[str, Any]]) -> str:
    rows = [(t["token_id"], t["device_id"], t["state"], t["created_at"], t["expires_at"]) for t in tokens]
    return views.table(("TOKEN ID", "DEVICE", "STATE", "CREATED", "EXPIRES"), rows)


def cmd_enroll_list(client: Client, args: argparse.Namespace) -> None:
    response = client.call("ListEnrollmentTokens", operator_pb2.ListEnrollmentTokensRequest(device_id=args.device_id))
    now = datetime.now(UTC)
    _emit([enrollment_token_view(t, now) for t in response.tokens], args.output, render_enrollment_tokens)


def cmd_enroll_revoke(client: Client, args: argparse.Namespace) -> None:
    token = client.call("RevokeEnrollmentToken", operator_pb2.RevokeEnrollmentTokenRequest(token_id=args.token_id))
    _emit(
        enrollment_token_view(token, datetime.now(UTC)),
        args.output,
        lambda t: f"revoked enrollment token {t['token_id']} of device {t['device_id']}",
    )


def _time_text(value: Timestamp) -> str:
    return value.ToDatetime(tzinfo=UTC).isoformat(timespec="seconds")


def token_view(token: operator_pb2.ApiToken) -> dict[str, Any]:
    return {
        "token_id": token.token_id,
        "name": token.name,
        "role": token.role,
        "created_at": _time_text(token.created_at),
        "revoked_at": _time_text(token.revoked_at) if token.HasField("revoked_at") else None,
    }


def render_tokens(tokens: list[dict[str, Any]]) -> str:
    rows = [(t["token_id"], t["name"], t["role"], t["created_at"], t["revoked_at"] or "-") for t in tokens]
    return views.table(("TOKEN ID", "NAME", "ROLE", "CREATED", "REVOKED"), rows)


def cmd_tokens_create(client: Client, args: argparse.Namespace) -> None:
    response = client.call("CreateApiToken", operator_pb2.CreateApiTokenRequest(name=args.name, role=args.role))
    result = {**token_view(response.token), "secret": response.secret}
    _emit(
        result,
        args.output,
        lambda r: f"{r['secret']}\n(token {r['token_id']}, role {r['role']}; shown once, store it now)",
    )


def cmd_tokens_list(client: Client, args: argparse.Namespace) -> None:
    response = client.call("ListApiTokens", operator_pb2.ListApiTokensRequest())
    _emit([token_view(t) for t in response.tokens], args.output, render_tokens)


def cmd_tokens_revoke(client: Client, args: argparse.Namespace) -> None:
    token = client.call("RevokeApiToken", operator_pb2.RevokeApiTokenRequest(token_id=args.token_id))
    _emit(token_view(token), args.output, lambda t: f"revoked token {t['token_id']} ({t['name']})")


def keys_view(response: operator_pb2.ListSigningKeysResponse) -> dict[str, Any]:
    return {
        "key_set_version": response.key_set_version,
        "devices": response.devices,
        "keys": [
            {
                "key_id": k.key_id,
                "public_key": k.public_key.hex(),
                "created_at": _time_text(k.created_at),
                "active": k.active,
                "trusted_by": k.trusted_by,
            }
            for k in response.keys
        ],
        "behind": [
            {
                "device_id": d.device_id,
                "key_set_version": d.trusted_key_set_version or None,
                "key_ids": list(d.trusted_key_ids),
                "last_seen": _time_text(d.last_seen) if d.HasField("last_seen") else None,
            }
            for d in response.behind
        ],
    }


def render_keys(data: dict[str, Any]) -> str:
    devices = data["devices"]
    rows = [
        (
            k["key_id"],
            "yes" if k["active"] else "",
            "-" if devices is None else f"{k['trusted_by']} of {devices}",
            k["created_at"],
            k["public_key"],
        )
        for k in data["keys"]
    ]
    lines = [
        f"key set version {data['key_set_version']}",
        views.table(("KEY ID", "ACTIVE", "TRUSTED BY", "CREATED", "PUBLIC KEY"), rows),
    ]
    if devices is None:
        lines.append(
            "The orchestrator does not report which keys devices trust: it runs an earlier release than this CLI."
        )
    behind = data["behind"]
    if behind:
        lines.append(f"{len(behind)} of {devices} devices have not reported key set version {data['key_set_version']}:")
        lines.append(
            views.table(
                ("  DEVICE", "KEY SET", "TRUSTED KEYS", "LAST SEEN"),
                [
                    (
                        "  " + d["device_id"],
                        d["key_set_version"] or "-",
                        ", ".join(d["key_ids"]) or "not reported",
                        views.age(d["last_seen"]),
                    )
                    for d in behind
                ],
            )
        )
    return "\n".join(lines)


def _keys_result(client: Client, response: operator_pb2.ListSigningKeysResponse) -> dict[str, Any]:
    """Return keys_view(response), with "devices": null when the orchestrator does not count trusting devices.

    An orchestrator of an earlier release leaves the count unset, which reads 0 although devices exist.
    """
    view = keys_view(response)
    if response.devices == 0 and client.call("ListDevices", operator_pb2.ListDevicesRequest(page_size=1)).devices:
        view["devices"] = None
        for key in view["keys"]:
            key["trusted_by"] = None
    return view


def cmd_keys_list(client: Client, args: argparse.Namespace) -> None:
    response = client.call("ListSigningKeys", operator_pb2.ListSigningKeysRequest())
    _emit(_keys_result(client, response), args.output, render_keys)


def cmd_keys_rotate(client: Client, args: argparse.Namespace) -> None:
    response = client.call("RotateSigningKey", operator_pb2.RotateSigningKeyRequest())
    _emit(_keys_result(client, response), args.output, render_keys)


def cmd_keys_retire(client: Client, args: argparse.Namespace) -> None:
    request = operator_pb2.RetireSigningKeyRequest(key_id=args.key_id, force=args.force)
    response = client.call("RetireSigningKey", request)
    _emit(_keys_result(client, response), args.output, render_keys)
