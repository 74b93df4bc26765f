"""The local inference API: gRPC over a Unix domain socket for applications on the device."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import Counter
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np

from edgefleet.agent.runtime.base import InvalidInputError
from edgefleet.agent.runtime.host import ModelHost, ModelNotFoundError
from edgefleet.agent.tensor_limits import check_shape
from edgefleet.agent.tensor_socket import decode_array
from edgefleet.common.files import SocketPathError, bind_error_message, check_socket_path, prepare_socket_path
from edgefleet.common.logs import RepeatedErrors
from edgefleet.common.serde import MODEL_STATE_NAMES, name_to_enum, tensor_to_proto
from edgefleet.v1 import inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)

# Largest tensor payload accepted or returned: a batch of camera frames fits, a runaway client does not.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Threads serving local calls. Each call occupies one while the runtime runs.
WORKERS = 4


def tensor_to_array(tensor: inference_pb2.Tensor) -> np.ndarray:
    """Decode a Tensor message.

    Raises ValueError naming the tensor when its shape is out of the limits of check_shape, or when dtype,
    shape and data disagree.
    """
    # decode_array multiplies the dimensions in int64, where a shape such as [2**40, 2**40] wraps to 0.
    shape = check_shape(tensor.name, tensor.shape)
    return decode_array(tensor.name, tensor.dtype, shape, tensor.data)


def array_to_tensor(name: str, array: np.ndarray) -> inference_pb2.Tensor:
    data = np.ascontiguousarray(array)
    little = data.astype(data.dtype.newbyteorder("<"), copy=False)
    return inference_pb2.Tensor(name=name, dtype=data.dtype.name, shape=list(data.shape), data=little.tobytes())


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, host: ModelHost) -> None:
        self.host = host
        self._failures = RepeatedErrors(log)  # A model that fails on every call logs one traceback.
        self._oversize = RepeatedErrors(log)  # Logs an oversize reply once per model, then every 1000th.

    def Infer(self, request: inference_pb2.InferRequest, context: grpc.ServicerContext) -> inference_pb2.InferResponse:
        try:
            repeated = sorted(name for name, count in Counter(t.name for t in request.inputs).items() if count > 1)
            if repeated:
                # A dict of feeds would keep only the last tensor of each name and run on it silently.
                raise ValueError(f"input names {repeated} appear more than once; send each input once")
            feeds = {t.name: tensor_to_array(t) for t in request.inputs}
            result = self.host.infer(request.model_name, feeds)
        except (ValueError, InvalidInputError) as error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except ModelNotFoundError as error:
            context.abort(grpc.StatusCode.NOT_FOUND, str(error))
        except Exception as error:
            self._failures.exception(request.model_name, "local inference on model=%s failed", request.model_name)
            context.abort(grpc.StatusCode.INTERNAL, f"inference failed: {error}")
        response = inference_pb2.InferResponse(
            model_name=result.model_name,
            model_version=result.model_version,
            variant_id=result.variant_id,
            outputs=[array_to_tensor(name, value) for name, value in result.outputs.items()],
            latency_ms=result.latency_ms,
        )
        size = response.ByteSize()
        if size > MAX_MESSAGE_BYTES:
            # gRPC would reject the reply after the model ran, with a bare RESOURCE_EXHAUSTED and no log line.
            message = (
                f"the reply of model {request.model_name!r} takes {size} bytes, over the reply limit of "
                f"{MAX_MESSAGE_BYTES}; send fewer rows per call"
            )
            self._oversize.warning(request.model_name, "local API: %s", message)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)
        return response

    def ListLocalModels(
        self, request: inference_pb2.ListLocalModelsRequest, context: grpc.ServicerContext
    ) -> inference_pb2.ListLocalModelsResponse:
        return inference_pb2.ListLocalModelsResponse(
            models=[
                inference_pb2.LocalModel(
                    model_name=m.name,
                    model_version=m.version,
                    variant_id=m.variant_id,
                    runtime=m.runtime,
                    providers=list(m.providers),
                    threads=m.threads,
                    inputs=[tensor_to_proto(t) for t in m.inputs],
                    outputs=[tensor_to_proto(t) for t in m.outputs],
                    state=name_to_enum("serving", MODEL_STATE_NAMES),
                )
                for m in self.host.list()
            ]
        )


class LocalApiServer:
    """Serves InferenceService and grpc.health.v1 on a Unix socket that the agent's user and group can open."""

    def __init__(self, host: ModelHost, socket_path: Path) -> None:
        """Prepare the server; raise ValueError when the socket path is too long for a Unix socket."""
        self.host = host
        self.socket_path = socket_path.absolute()  # gRPC needs unix:///absolute/path.
        check_socket_path(self.socket_path, "local API socket", "--socket")
        self._server: grpc.Server | None = None

    def start(self) -> None:
        """Bind the socket and start serving; raise SocketPathError naming the path, --socket and the fix."""
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        prepare_socket_path(self.socket_path, "local API socket", "--socket")
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="local-api"),
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(self.host), server)
        health_servicer = health.HealthServicer()
        health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        old_umask = os.umask(0o117)  # Socket mode 0660.
        try:
            server.add_insecure_port(f"unix://{self.socket_path}")
            server.start()
        except RuntimeError as error:
            # gRPC reports only "Failed to bind", but a plain bind of the same path gives the reason.
            raise SocketPathError(self._bind_failure(error)) from error
        finally:
            os.umask(old_umask)
        self._server = server
        log.info("local inference API listening on %s", self.socket_path)

    def _bind_failure(self, error: RuntimeError) -> str:
        """Return the reason that gRPC could not bind the socket, found by binding it with the socket module."""
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.bind(str(self.socket_path))
        except OSError as bind_error:
            return bind_error_message(bind_error, self.socket_path, "local API socket", "--socket")
        else:
            self.socket_path.unlink(missing_ok=True)
        finally:
            probe.close()
        return f"gRPC cannot listen on the local API socket {self.socket_path}: {error}; set --socket to another path"

    def stop(self, grace_s: float = 2.0) -> None:
        if self._server is not None:
            self._server.stop(grace_s).wait(grace_s + 1)
            self._server = None
        self.socket_path.unlink(missing_ok=True)


def wait_for_socket(path: Path, timeout_s: float) -> bool:
    """Return True once path exists as a socket, False after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.is_socket():
            return True
        time.sleep(0.05)
    return False
