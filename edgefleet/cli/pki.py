"""edgefleet pki: create the fleet CA and issue server and device certificates."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgefleet.common import argtypes
from edgefleet.common.errors import EXIT_USAGE, EdgefleetError

# 100 years. A validity that ends after 9999-12-31 cannot be written in an X.509 certificate.
MAX_DAYS = 36_500


def add_commands(nouns: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `pki init` and `pki issue`; they work on local files and need no orchestrator."""
    from edgefleet.cli.main import output_flag_of_command

    pki = nouns.add_parser("pki", help="create the fleet CA and issue certificates (local files)")
    verbs = pki.add_subparsers(dest="verb", required=True)

    sub = verbs.add_parser("init", help="create a fleet CA and the orchestrator's server certificate in DIR")
    sub.add_argument("--dir", type=Path, required=True, help="directory for ca.pem, ca.key, server.pem, server.key")
    sub.add_argument(
        "--host",
        action="append",
        default=[],
        help="IP address or DNS name the orchestrator is reached at; repeat for several "
        "(default 127.0.0.1, ::1 and localhost)",
    )
    sub.add_argument(
        "--days",
        type=argtypes.whole_number(1, MAX_DAYS),
        default=3650,
        help=f"validity of the CA in days, 1 to {MAX_DAYS} (default 3650)",
    )
    output_flag_of_command(sub)
    sub.set_defaults(local_handler=cmd_init)

    sub = verbs.add_parser("issue", help="issue a device certificate that binds the device id")
    sub.add_argument("--dir", type=Path, required=True, help="the CA directory of `pki init`")
    sub.add_argument("--device-id", required=True, help="device id to bind in the certificate")
    sub.add_argument("--out", type=Path, help="directory for ID.pem and ID.key (default DIR/devices)")
    sub.add_argument(
        "--days",
        type=argtypes.whole_number(1, MAX_DAYS),
        default=397,
        help=f"validity in days, 1 to {MAX_DAYS} (default 397)",
    )
    output_flag_of_command(sub)
    sub.set_defaults(local_handler=cmd_issue)


def cmd_init(args: argparse.Namespace) -> int:
    from edgefleet.orchestrator.security.pki import DEFAULT_HOSTS, SERVER_CERT, SERVER_KEY, PkiError, init_ca

    hosts = tuple(args.host) or DEFAULT_HOSTS
    try:
        ca = init_ca(args.dir, hosts=hosts, days=args.days)
    except PkiError as error:
        return _fail(str(error), _exit_code(error))
    except OSError as error:
        return _fail(_write_error(args.dir, error), EXIT_USAGE)
    if args.output == "json":
        created = {
            "ca_cert": str(ca.cert_path),
            "ca_key": str(ca.key_path),
            "ca_not_after": ca.not_after.isoformat(timespec="seconds"),
            "server_cert": str(args.dir / SERVER_CERT),
            "server_key": str(args.dir / SERVER_KEY),
            "hosts": list(hosts),
        }
        print(json.dumps(created, indent=2))
        return 0
    print(f"created the fleet CA {ca.cert_path} (key {ca.key_path}, mode 0600)")
    print(f"created the orchestrator certificate {args.dir / SERVER_CERT} for {', '.join(hosts)}")
    print(
        f"start the orchestrator with --ca-cert {ca.cert_path} --cert {args.dir / SERVER_CERT} "
        f"--key {args.dir / SERVER_KEY}"
    )
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    from edgefleet.orchestrator.security.pki import PkiError, issue_device_certificate

    try:
        issued = issue_device_certificate(args.dir, args.device_id, out_dir=args.out, days=args.days)
    except (PkiError, EdgefleetError) as error:
        return _fail(str(error), _exit_code(error))
    except OSError as error:
        return _fail(_write_error(args.out or args.dir, error), EXIT_USAGE)
    if args.output == "json":
        certificate = {
            "device_id": args.device_id,
            "cert": str(issued.cert_path),
            "key": str(issued.key_path),
            "subject": issued.subject,
            "not_after": issued.not_after.isoformat(timespec="seconds"),
        }
        print(json.dumps(certificate, indent=2))
        return 0
    print(f"issued {issued.cert_path} and {issued.key_path} (mode 0600) for device {args.device_id}")
    print(f"valid until {issued.not_after:%Y-%m-%d}; copy both and the CA certificate to the device")
    return 0


def _exit_code(error: Exception) -> int:
    """Return 4 (conflict) for a CA or certificate that already exists and 2 (usage) for other errors."""
    from edgefleet.cli.main import EXIT_CONFLICT
    from edgefleet.orchestrator.security.pki import PkiExistsError

    return EXIT_CONFLICT if isinstance(error, PkiExistsError) else EXIT_USAGE


def _write_error(directory: Path, error: OSError) -> str:
    """Return the message for a directory that the CA files cannot be read from or written to."""
    where = error.filename or directory
    # mkdir reports a file in the way as "File exists", and a path below a file as "Not a directory".
    reason = "a file is in the way" if isinstance(error, FileExistsError | NotADirectoryError) else error.strerror
    return f"cannot use {where}: {reason or error}; give --dir (and --out) a directory that this user can write"


def _fail(message: str, code: int) -> int:
    import sys

    print(f"edgefleet: {message}", file=sys.stderr)
    return code
