"""The operator CLI, edgefleet. It talks to the orchestrator's OperatorService only."""

import os

# gRPC's C core reads GRPC_VERBOSITY once, when grpc is imported, and otherwise prints INFO lines such as
# "ssl_transport_security.cc ... Handshake failed" before the CLI's own error for the same failure.
# The package sets it before edgefleet.cli.main imports grpc. An operator's own setting wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
