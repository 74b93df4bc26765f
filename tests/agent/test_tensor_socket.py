"""The tensor socket against a real ModelHost on real onnxruntime models: framing, errors, concurrency."""

from __future__ import annotations

import fcntl
import json
import logging
import mmap
import os
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from edgefleet.agent import tensor_socket
from edgefleet.agent.config import AgentConfig
from edgefleet.agent.runtime import ModelHost
from edgefleet.agent.runtime.host import PreparedInference
from edgefleet.agent.tensor_socket import (
    MAGIC,
    FrameReader,
    TensorSocketError,
    TensorSocketServer,
    read_frame,
    write_frame,
)
from edgefleet.agent.tensor_socket_client import TensorSocketClient
from tests.agent.models import linear_reference, onnx_linear, onnx_two_inputs

BATCH = np.arange(8, dtype=np.float32).reshape(2, 4) / 8


@pytest.fixture
def host(tmp_path: Path) -> Iterator[ModelHost]:
    with ModelHost(default_threads=1) as model_host:
        model_host.install("linear", "1", "linear:1:source", onnx_linear(tmp_path / "linear.onnx"), "onnx")
        model_host.install("pair", "1", "pair:1:source", onnx_two_inputs(tmp_path / "pair.onnx"), "onnx")
        yield model_host


@pytest.fixture
def server(host: ModelHost, tmp_path: Path) -> Iterator[TensorSocketServer]:
    tensor_server = TensorSocketServer(host, tmp_path / "agent.tensor.sock")
    tensor_server.start()
    yield tensor_server
    tensor_server.stop()


@pytest.fixture
def client(server: TensorSocketServer) -> Iterator[TensorSocketClient]:
    with TensorSocketClient(server.socket_path, timeout_s=10) as tensor_client:
        yield tensor_client


def raw_connection(server: TensorSocketServer) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(server.socket_path))
    return sock


def test_infer_matches_reference(client: TensorSocketClient) -> None:
    reply = client.infer("linear", {"x": BATCH})

    np.testing.assert_allclose(reply.outputs["y"], linear_reference(BATCH), rtol=1e-5)


def test_infer_reports_variant(client: TensorSocketClient) -> None:
    reply = client.infer("linear", {"x": BATCH})

    assert (reply.model_name, reply.model_version, reply.variant_id) == ("linear", "1", "linear:1:source")


def test_infer_latency(client: TensorSocketClient) -> None:
    assert client.infer("linear", {"x": BATCH}).latency_ms > 0


def test_infer_two_inputs(client: TensorSocketClient) -> None:
    ids = np.array([[1, 2], [3, 4]], dtype=np.int64)
    reply = client.infer("pair", {"ids": ids, "offset": np.array([0.5], dtype=np.float32)})

    np.testing.assert_allclose(reply.outputs["total"], [3.5, 7.5])


def test_infer_converts_float64(client: TensorSocketClient) -> None:
    reply = client.infer("linear", {"x": BATCH.astype(np.float64)})

    np.testing.assert_allclose(reply.outputs["y"], linear_reference(BATCH), rtol=1e-5)


def test_unknown_model(client: TensorSocketClient) -> None:
    with pytest.raises(TensorSocketError, match="'missing' is not installed") as caught:
        client.infer("missing", {"x": BATCH})

    assert caught.value.code == "NOT_FOUND"


def test_wrong_shape(client: TensorSocketClient) -> None:
    with pytest.raises(TensorSocketError, match="x") as caught:
        client.infer("linear", {"x": np.zeros((2, 5), np.float32)})

    assert caught.value.code == "INVALID_ARGUMENT"


def test_connection_survives_error(client: TensorSocketClient) -> None:
    with pytest.raises(TensorSocketError):
        client.infer("missing", {"x": BATCH})

    assert client.infer("linear", {"x": BATCH}).outputs["y"].shape == (2, 3)


def test_models(client: TensorSocketClient) -> None:
    models = {m["model_name"]: m for m in client.models()}

    assert models["linear"]["inputs"] == [{"name": "x", "dtype": "float32", "shape": [-1, 4]}]
    assert models["linear"]["runtime"] == "onnxruntime"


def test_payload_size_mismatch(server: TensorSocketServer) -> None:
    with raw_connection(server) as sock:
        header = {"op": "infer", "model": "linear", "inputs": [{"name": "x", "dtype": "float32", "shape": [2, 4]}]}
        write_frame(sock, header, [np.zeros(3, np.uint8)])
        frame = read_frame(sock)

    assert frame is not None
    assert frame[0]["code"] == "INVALID_ARGUMENT"
    assert frame[0]["message"] == "the inputs (x [2, 4] float32) take 32 bytes, but the payload has 3"


def test_unknown_dtype(server: TensorSocketServer) -> None:
    with raw_connection(server) as sock:
        write_frame(
            sock, {"op": "infer", "model": "linear", "inputs": [{"name": "x", "dtype": "float7", "shape": [1]}]}
        )
        frame = read_frame(sock)

    assert frame is not None
    assert "unknown dtype 'float7'" in frame[0]["message"]


def test_unknown_op(server: TensorSocketServer) -> None:
    with raw_connection(server) as sock:
        write_frame(sock, {"op": "train"})
        frame = read_frame(sock)

    assert frame is not None
    assert frame[0]["message"] == "unknown op 'train'; use 'infer', 'models' or 'shm'"


def test_bad_magic_closes(server: TensorSocketServer) -> None:
    with raw_connection(server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        frame = read_frame(sock)
        try:
            after = sock.recv(1)
        except ConnectionResetError:  # The server closed with the rest of the request unread.
            after = b""

    assert frame is not None
    assert "not b'EFT1'" in frame[0]["message"]
    assert after == b""


def test_oversized_payload_rejected(server: TensorSocketServer) -> None:
    with raw_connection(server) as sock:
        sock.sendall(struct.pack("<4sIQ", MAGIC, 2, 1 << 40) + b"{}")
        frame = read_frame(sock)

    assert frame is not None
    assert "exceeds the limit" in frame[0]["message"]


def test_header_not_object(server: TensorSocketServer) -> None:
    with raw_connection(server) as sock:
        sock.sendall(struct.pack("<4sIQ", MAGIC, 2, 0) + b"[]")
        frame = read_frame(sock)

    assert frame is not None
    assert frame[0]["message"] == "frame header is a JSON list, not an object"


def test_concurrent_equal_sequential(server: TensorSocketServer) -> None:
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((3, 4)).astype(np.float32) for _ in range(4)]
    results: dict[int, list[np.ndarray]] = {}

    def work(index: int) -> None:
        with TensorSocketClient(server.socket_path, timeout_s=10) as own:
            results[index] = [own.infer("linear", {"x": batches[index]}).outputs["y"] for _ in range(50)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    for index, outputs in results.items():
        for output in outputs:
            np.testing.assert_allclose(output, linear_reference(batches[index]), rtol=1e-5)


def test_client_reconnects(host: ModelHost, tmp_path: Path) -> None:
    path = tmp_path / "agent.tensor.sock"
    first = TensorSocketServer(host, path)
    first.start()
    with TensorSocketClient(path, timeout_s=10) as tensor_client:
        tensor_client.infer("linear", {"x": BATCH})
        first.stop()
        second = TensorSocketServer(host, path)
        second.start()
        try:
            reply = tensor_client.infer("linear", {"x": BATCH})
        finally:
            second.stop()

    assert reply.variant_id == "linear:1:source"


def test_connection_limit(host: ModelHost, tmp_path: Path) -> None:
    limited = TensorSocketServer(host, tmp_path / "agent.tensor.sock", max_connections=1)
    limited.start()
    try:
        with TensorSocketClient(limited.socket_path, timeout_s=10) as first:
            first.infer("linear", {"x": BATCH})
            with (
                TensorSocketClient(limited.socket_path, timeout_s=10) as second,
                pytest.raises(TensorSocketError) as caught,
            ):
                second.infer("linear", {"x": BATCH})
    finally:
        limited.stop()

    assert caught.value.code == "RESOURCE_EXHAUSTED"


def test_connection_limit_evicts_idle(
    host: ModelHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """At the limit, a connection idle for EVICT_IDLE_AFTER_S makes room for a new one."""
    monkeypatch.setattr(tensor_socket, "EVICT_IDLE_AFTER_S", 0.2)
    limited = TensorSocketServer(host, tmp_path / "agent.tensor.sock", max_connections=1)
    limited.start()
    try:
        with raw_connection(limited) as idle:
            time.sleep(0.4)
            with caplog.at_level(logging.INFO), TensorSocketClient(limited.socket_path, timeout_s=10) as newcomer:
                reply = newcomer.infer("linear", {"x": BATCH})
            closed = idle.recv(1)
    finally:
        limited.stop()

    np.testing.assert_allclose(reply.outputs["y"], linear_reference(BATCH), rtol=1e-5)
    assert closed == b""
    assert "closed a connection idle for 0 s to admit a new one" in caplog.text


def test_rejections_logged_sparsely(host: ModelHost, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    limited = TensorSocketServer(host, tmp_path / "agent.tensor.sock", max_connections=1)
    limited.start()
    try:
        with TensorSocketClient(limited.socket_path, timeout_s=10) as first:
            first.infer("linear", {"x": BATCH})
            for _ in range(5):
                with (
                    TensorSocketClient(limited.socket_path, timeout_s=10) as rejected,
                    pytest.raises(TensorSocketError),
                ):
                    rejected.infer("linear", {"x": BATCH})
    finally:
        limited.stop()

    rejections = [r for r in caplog.records if "rejected a connection" in r.getMessage()]
    assert len(rejections) == 1
    assert "(1 so far)" in rejections[0].getMessage()


def onnx_one_row(path: Path) -> Path:
    """Write a model that reshapes x (batch, 4) to (4,): it warms up on one row and fails on more."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "row_shape"], ["y"])],
        "one_row",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(np.array([4], np.int64), "row_shape")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_failing_model_logged_once(host: ModelHost, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    host.install("failing", "1", "failing:1:source", onnx_one_row(tmp_path / "one_row.onnx"), "onnx")
    server = TensorSocketServer(host, tmp_path / "agent.tensor.sock")
    server.start()
    try:
        with TensorSocketClient(server.socket_path, timeout_s=10) as client:
            codes = []
            for _ in range(3):
                with pytest.raises(TensorSocketError) as caught:
                    client.infer("failing", {"x": BATCH})
                codes.append(caught.value.code)
    finally:
        server.stop()

    failures = [r for r in caplog.records if "inference on model=failing failed" in r.getMessage()]
    assert codes == ["INTERNAL"] * 3
    assert len(failures) == 1
    assert failures[0].exc_info is not None


def test_socket_mode(server: TensorSocketServer) -> None:
    assert stat.S_IMODE(server.socket_path.stat().st_mode) == 0o660


def test_stop_removes_socket(server: TensorSocketServer) -> None:
    server.stop()

    assert not server.socket_path.exists()


def test_no_agent(tmp_path: Path) -> None:
    with (
        TensorSocketClient(tmp_path / "none.sock") as no_agent,
        pytest.raises(ConnectionError, match="is edgefleet-agent running"),
    ):
        no_agent.infer("linear", {"x": BATCH})


@pytest.mark.parametrize("kind", ["regular file", "directory"])
def test_path_not_a_socket(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "agent.tensor.sock"
    if kind == "directory":
        path.mkdir()
    else:
        path.write_text("not a socket")

    with TensorSocketClient(path) as client, pytest.raises(ConnectionError) as raised:
        client.infer("linear", {"x": BATCH})

    assert f"it is a {kind}, not a socket; give the path of the agent's --tensor-socket" in str(raised.value)
    assert "is edgefleet-agent running" not in str(raised.value)


def test_client_before_agent(host: ModelHost, tmp_path: Path) -> None:
    """A client created before the agent listens connects on its first call after the agent starts."""
    path = tmp_path / "agent.tensor.sock"
    early = TensorSocketClient(path, timeout_s=10)
    with pytest.raises(ConnectionError):
        early.infer("linear", {"x": BATCH})
    late_server = TensorSocketServer(host, path)
    late_server.start()
    try:
        reply = early.infer("linear", {"x": BATCH})
    finally:
        early.close()
        late_server.stop()

    np.testing.assert_allclose(reply.outputs["y"], linear_reference(BATCH), rtol=1e-5)


def test_long_path(host: ModelHost, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--tensor-socket"):
        TensorSocketServer(host, tmp_path / ("d" * 120) / "agent.tensor.sock")


def test_default_path(tmp_path: Path) -> None:
    config = AgentConfig(state_dir=tmp_path, socket=tmp_path / "run" / "agent.sock")

    assert config.tensor_socket_path == tmp_path / "run" / "agent.tensor.sock"


def test_shared_memory_matches_reference(client: TensorSocketClient) -> None:
    batch = np.random.default_rng(1).standard_normal((2048, 4)).astype(np.float32)  # 32 KiB: shared memory

    reply = client.infer("linear", {"x": batch})

    np.testing.assert_allclose(reply.outputs["y"], linear_reference(batch), rtol=1e-5)


def test_shared_memory_outputs_are_copies(client: TensorSocketClient) -> None:
    first_batch = np.full((2048, 4), 1.0, np.float32)
    first = client.infer("linear", {"x": first_batch}).outputs["y"]
    client.infer("linear", {"x": np.full((2048, 4), -5.0, np.float32)})

    np.testing.assert_allclose(first, linear_reference(first_batch), rtol=1e-5)


def test_shared_memory_region_grows(client: TensorSocketClient) -> None:
    client.infer("linear", {"x": np.zeros((2048, 4), np.float32)})
    batch = np.random.default_rng(2).standard_normal((200_000, 4)).astype(np.float32)  # 3.2 MB

    reply = client.infer("linear", {"x": batch})

    np.testing.assert_allclose(reply.outputs["y"], linear_reference(batch), rtol=1e-5)


def test_inline_client_matches(server: TensorSocketServer) -> None:
    batch = np.random.default_rng(3).standard_normal((2048, 4)).astype(np.float32)
    with TensorSocketClient(server.socket_path, shared_memory=False) as inline:
        reply = inline.infer("linear", {"x": batch})

    np.testing.assert_allclose(reply.outputs["y"], linear_reference(batch), rtol=1e-5)


def test_shared_infer_without_region(server: TensorSocketServer) -> None:
    header = {
        "op": "infer",
        "model": "linear",
        "shm": True,
        "inputs": [{"name": "x", "dtype": "float32", "shape": [2, 4]}],
    }
    with raw_connection(server) as sock:
        write_frame(sock, header)
        frame = read_frame(sock)

    assert frame is not None
    assert "region set up with op 'shm'" in frame[0]["message"]


def test_shared_region_size_checked(server: TensorSocketServer) -> None:
    with raw_connection(server) as sock:
        write_frame(sock, {"op": "shm", "bytes": 0})
        frame = read_frame(sock)

    assert frame is not None
    assert frame[0]["message"].startswith("'bytes' must be an integer from 1 to")


def test_shared_region_sealed(server: TensorSocketServer) -> None:
    with raw_connection(server) as sock:
        write_frame(sock, {"op": "shm", "bytes": 4096})
        frame, fds = FrameReader(sock).read_with_fds()
    try:
        seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
    finally:
        for fd in fds:
            os.close(fd)

    assert frame is not None
    assert seals & fcntl.F_SEAL_SHRINK
    assert seals & fcntl.F_SEAL_GROW


def test_shared_memory_fallback(tmp_path: Path) -> None:
    """An agent that cannot create a region gets the tensors inline from then on."""
    path = tmp_path / "agent.tensor.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    requests: list[dict[str, object]] = []

    def agent_without_memfd() -> None:
        conn, _ = listener.accept()
        with conn:
            reader = FrameReader(conn)
            while (frame := reader.read()) is not None:
                requests.append(frame[0])
                if frame[0]["op"] == "shm":
                    write_frame(conn, {"ok": False, "code": "RESOURCE_EXHAUSTED", "message": "no memfd"})
                    continue
                output = np.frombuffer(frame[1], np.float32)[:3].copy()
                reply = {"ok": True, "model_name": "linear", "model_version": "1", "variant_id": "v", "latency_ms": 1.0}
                write_frame(
                    conn,
                    {**reply, "outputs": [{"name": "y", "dtype": "float32", "shape": [3]}]},
                    [output.view(np.uint8)],
                )

    thread = threading.Thread(target=agent_without_memfd, daemon=True)
    thread.start()
    batch = np.arange(2048 * 4, dtype=np.float32).reshape(2048, 4)
    with TensorSocketClient(path, timeout_s=10) as fallback:
        reply = fallback.infer("linear", {"x": batch})
        shared_after = fallback.shared_memory
    thread.join(10)
    listener.close()

    np.testing.assert_array_equal(reply.outputs["y"], [0.0, 1.0, 2.0])
    assert [r["op"] for r in requests] == ["shm", "infer"]
    assert requests[1]["shm"] is False
    assert shared_after is False


def onnx_widen(path: Path) -> Path:
    """Write y = x @ ones((4, 64)): each 16-byte input row gives a 256-byte output row."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "ones"], ["y"])],
        "widen",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
        [numpy_helper.from_array(np.ones((4, 64), np.float32), "ones")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_outputs_over_limit(host: ModelHost, tmp_path: Path) -> None:
    host.install("widen", "1", "widen:1:source", onnx_widen(tmp_path / "widen.onnx"), "onnx")
    small = TensorSocketServer(host, tmp_path / "small.sock", max_payload_bytes=1024)
    small.start()
    try:
        with TensorSocketClient(small.socket_path, timeout_s=10, shared_memory=False) as tensor_client:
            with pytest.raises(TensorSocketError, match="take 2048 bytes, over the reply limit of 1024") as caught:
                tensor_client.infer("widen", {"x": np.ones((8, 4), np.float32)})
            after = tensor_client.infer("widen", {"x": np.ones((2, 4), np.float32)})
    finally:
        small.stop()

    assert caught.value.code == "RESOURCE_EXHAUSTED"
    assert after.outputs["y"].shape == (2, 64)


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ([2**20, 2**20], "of 1099511627776 elements, over the limit of 67108864"),
        ([2**40, 1], "each dimension must be from 0 to 67108864"),
        ([-1, 4], "each dimension must be from 0 to 67108864"),
        ([1] * 40, "has 40 axes; a tensor may have at most 32"),
    ],
)
def test_shape_over_limits(server: TensorSocketServer, shape: list[int], expected: str) -> None:
    entry = {"name": "x", "dtype": "float32", "shape": shape}
    with raw_connection(server) as sock:
        write_frame(sock, {"op": "infer", "model": "linear", "inputs": [entry]})
        frame = read_frame(sock)

    assert frame is not None
    assert frame[0]["code"] == "INVALID_ARGUMENT"
    assert expected in frame[0]["message"]
    assert "input 'x'" in frame[0]["message"]


def test_duplicate_input_names(server: TensorSocketServer) -> None:
    entry = {"name": "x", "dtype": "float32", "shape": [1, 4]}
    with raw_connection(server) as sock:
        write_frame(sock, {"op": "infer", "model": "linear", "inputs": [entry, entry]}, [np.zeros(32, np.uint8)])
        frame = read_frame(sock)

    assert frame is not None
    assert frame[0]["message"] == "input 'x' appears twice in 'inputs'; send each input once"


def test_big_endian_dtype_name(server: TensorSocketServer) -> None:
    entry = {"name": "x", "dtype": ">f4", "shape": [1, 4]}
    with raw_connection(server) as sock:
        write_frame(sock, {"op": "infer", "model": "linear", "inputs": [entry]}, [np.zeros(16, np.uint8)])
        frame = read_frame(sock)

    assert frame is not None
    assert "big-endian dtype '>f4'" in frame[0]["message"]


def test_deeply_nested_header(server: TensorSocketServer) -> None:
    header = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with raw_connection(server) as sock:
        sock.sendall(struct.pack("<4sIQ", MAGIC, len(header), 0) + header)
        frame = read_frame(sock)

    assert frame is not None
    assert frame[0]["message"].startswith("frame header is not valid UTF-8 JSON")


def test_reply_names_requested_model(host: ModelHost, client: TensorSocketClient, tmp_path: Path) -> None:
    host.install("alias", "1", "linear:1:source", onnx_linear(tmp_path / "alias.onnx"), "onnx")
    client.infer("linear", {"x": BATCH})

    assert client.infer("alias", {"x": BATCH}).model_name == "alias"


def test_string_input_rejected(client: TensorSocketClient) -> None:
    with pytest.raises(ValueError, match="input 'x' has dtype <U1"):
        client.infer("linear", {"x": np.array([["a"] * 4])})


def test_zero_timeout_rejected(server: TensorSocketServer) -> None:
    with pytest.raises(ValueError, match="timeout_s must be above 0"):
        TensorSocketClient(server.socket_path, timeout_s=0)


def test_payload_cut_short(tmp_path: Path) -> None:
    left, right = socket.socketpair()
    with left, right:
        left.sendall(struct.pack("<4sIQ", MAGIC, 2, 10 * 1024 * 1024) + b"{}" + bytes(100))
        left.shutdown(socket.SHUT_WR)
        with pytest.raises(ConnectionError, match="after 100 of 10485760 payload bytes"):
            FrameReader(right).read()


def test_claim_rejects_file(host: ModelHost, tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("keep")

    with pytest.raises(ValueError, match="exists and is not a socket"):
        TensorSocketServer(host, path).start()
    assert path.read_text() == "keep"


def test_claim_rejects_live_socket(host: ModelHost, server: TensorSocketServer) -> None:
    with pytest.raises(ValueError, match="another process serves the socket"):
        TensorSocketServer(host, server.socket_path).start()


def test_claim_replaces_stale_socket(host: ModelHost, tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # The path stays behind, as after a killed agent.
    replacement = TensorSocketServer(host, path)
    replacement.start()
    try:
        with TensorSocketClient(path, timeout_s=10) as tensor_client:
            reply = tensor_client.infer("linear", {"x": BATCH})
    finally:
        replacement.stop()

    assert reply.variant_id == "linear:1:source"


@pytest.mark.parametrize("delay_s", [0.0, 0.05])
def test_spinning_reader(delay_s: float) -> None:
    """A frame that comes during the poll and one that comes after it, when the reader blocks, both arrive."""
    left, right = socket.socketpair()
    with left, right:
        sender = threading.Timer(delay_s, write_frame, args=(left, {"op": "models"}))
        sender.start()
        frame = FrameReader(right, spin_s=0.001).read()
        sender.join()

    assert frame is not None
    assert frame[0] == {"op": "models"}


LARGE = np.random.default_rng(4).standard_normal((2048, 4)).astype(np.float32)  # 32 KiB: shared memory


def test_input_arrays_from_model_list(client: TensorSocketClient) -> None:
    arrays = client.input_arrays("pair", shapes={"ids": [3, 2]})

    assert list(arrays) == ["ids", "offset"]
    assert (arrays["ids"].shape, arrays["ids"].dtype) == ((3, 2), np.dtype(np.int64))
    assert (arrays["offset"].shape, arrays["offset"].dtype) == ((1,), np.dtype(np.float32))


def test_input_arrays_infer(client: TensorSocketClient) -> None:
    arrays = client.input_arrays("linear", shapes={"x": LARGE.shape})
    arrays["x"][...] = LARGE

    reply = client.infer("linear", arrays)

    np.testing.assert_allclose(reply.outputs["y"], linear_reference(LARGE), rtol=1e-5)
    assert client.copied_input_bytes == 0


def test_input_arrays_small_input(client: TensorSocketClient) -> None:
    """Inputs under the shared memory threshold travel in the payload, also when they come from input_arrays."""
    arrays = client.input_arrays("linear", shapes={"x": BATCH.shape})
    arrays["x"][...] = BATCH

    reply = client.infer("linear", arrays)

    np.testing.assert_allclose(reply.outputs["y"], linear_reference(BATCH), rtol=1e-5)


def test_input_arrays_read_live(client: TensorSocketClient) -> None:
    """infer reads the arrays' memory at call time, so writes between calls reach the model."""
    arrays = client.input_arrays("linear", shapes={"x": LARGE.shape})
    arrays["x"][...] = 0.0
    client.infer("linear", arrays)
    arrays["x"][...] = LARGE

    reply = client.infer("linear", arrays)

    np.testing.assert_allclose(reply.outputs["y"], linear_reference(LARGE), rtol=1e-5)


def test_input_arrays_kept_by_infer(client: TensorSocketClient) -> None:
    """The outputs go after the inputs in the region, so the inputs survive the call."""
    arrays = client.input_arrays("linear", shapes={"x": LARGE.shape})
    arrays["x"][...] = LARGE

    client.infer("linear", arrays)

    np.testing.assert_array_equal(arrays["x"], LARGE)


def test_input_arrays_two_inputs(client: TensorSocketClient) -> None:
    arrays = client.input_arrays("pair", shapes={"ids": [4096, 2]})  # 64 KiB of int64
    arrays["ids"][...] = np.arange(8192).reshape(4096, 2)
    arrays["offset"][...] = 0.5

    reply = client.infer("pair", arrays)

    np.testing.assert_allclose(reply.outputs["total"], np.arange(8192).reshape(4096, 2).sum(axis=1) + 0.5)
    assert client.copied_input_bytes == 0


def test_input_arrays_reordered(client: TensorSocketClient) -> None:
    """Feeds from input_arrays in another order are not where the header puts them, so infer moves them."""
    arrays = client.input_arrays("pair", shapes={"ids": [4096, 2]})
    ids = np.arange(8192).reshape(4096, 2)
    arrays["ids"][...] = ids
    arrays["offset"][...] = 0.5

    reply = client.infer("pair", {"offset": arrays["offset"], "ids": arrays["ids"]})

    np.testing.assert_allclose(reply.outputs["total"], ids.sum(axis=1) + 0.5)
    assert client.copied_input_bytes == ids.nbytes + 4


def test_input_arrays_overlapping_view(client: TensorSocketClient) -> None:
    """A feed that overlaps its own place in the region, one row further on, arrives unchanged."""
    arrays = client.input_arrays("linear", shapes={"x": [4096, 4]})
    arrays["x"][...] = np.arange(4096 * 4, dtype=np.float32).reshape(4096, 4) / 4096
    shifted = arrays["x"][1:]
    expected = linear_reference(shifted.copy())

    reply = client.infer("linear", {"x": shifted})

    np.testing.assert_allclose(reply.outputs["y"], expected, rtol=1e-5)


def test_input_arrays_ordinary_feeds_copied(client: TensorSocketClient) -> None:
    client.infer("linear", {"x": LARGE})

    assert client.copied_input_bytes == LARGE.nbytes


def test_input_arrays_caller_dtypes(client: TensorSocketClient) -> None:
    arrays = client.input_arrays(
        "pair", shapes={"ids": [2, 2], "offset": [1]}, dtypes={"ids": np.int64, "offset": "float32"}
    )
    arrays["ids"][...] = [[1, 2], [3, 4]]
    arrays["offset"][...] = 0.5

    reply = client.infer("pair", arrays)

    np.testing.assert_allclose(reply.outputs["total"], [3.5, 7.5])
    assert client.copied_input_bytes == 0


def test_input_arrays_dynamic_shape(client: TensorSocketClient) -> None:
    with pytest.raises(ValueError, match=r"dynamic shape \[-1, 4\].*pass shapes=\{'x': \[N, 4\]\}"):
        client.input_arrays("linear")


def test_input_arrays_given_dynamic_shape(client: TensorSocketClient) -> None:
    with pytest.raises(ValueError, match=r"-1 is not a size; pass shapes=\{'x': \[N, 4\]\}"):
        client.input_arrays("linear", shapes={"x": [-1, 4]})


def test_input_arrays_shape_over_limit(client: TensorSocketClient) -> None:
    with pytest.raises(ValueError, match=r"input 'x' has shape \[1099511627776, 4\]; each dimension must be"):
        client.input_arrays("linear", shapes={"x": [1 << 40, 4]})


def test_input_arrays_fixed_axis_mismatch(client: TensorSocketClient) -> None:
    with pytest.raises(ValueError, match=r"\[2, 999\], but its axis 1 has the fixed size 4"):
        client.input_arrays("linear", shapes={"x": [2, 999]})


def test_input_arrays_axis_count_mismatch(client: TensorSocketClient) -> None:
    with pytest.raises(ValueError, match=r"the shape \[8\], but the model lists \[-1, 4\] with 2 axes"):
        client.input_arrays("linear", shapes={"x": [8]})


def test_input_arrays_integer_name(client: TensorSocketClient) -> None:
    with pytest.raises(TypeError, match="input names must be str, got 0 of type int"):
        client.input_arrays("linear", shapes={0: [2, 4]}, dtypes={0: np.float32})  # type: ignore[dict-item]


def test_infer_bare_array(client: TensorSocketClient) -> None:
    with pytest.raises(TypeError, match=r"mapping of input name to array.*not ndarray"):
        client.infer("linear", BATCH)  # type: ignore[arg-type]


def test_infer_integer_name(client: TensorSocketClient) -> None:
    with pytest.raises(TypeError, match="input names must be str, got 0 of type int"):
        client.infer("linear", {0: BATCH})  # type: ignore[dict-item]


def test_input_arrays_unknown_model(client: TensorSocketClient) -> None:
    with pytest.raises(TensorSocketError, match="'missing' is not installed") as caught:
        client.input_arrays("missing")

    assert caught.value.code == "NOT_FOUND"


def test_input_arrays_unknown_shape_name(client: TensorSocketClient) -> None:
    with pytest.raises(ValueError, match=r"shapes names \['z'\], which are not inputs of model 'linear'"):
        client.input_arrays("linear", shapes={"x": [1, 4], "z": [1]})


def test_input_arrays_dtype_without_shape(client: TensorSocketClient) -> None:
    with pytest.raises(ValueError, match=r"inputs \['offset'\] have a dtype but no shape"):
        client.input_arrays("pair", shapes={"ids": [1, 2]}, dtypes={"ids": np.int64, "offset": np.float32})


@pytest.mark.parametrize("dtype", [">f4", "U4", object])
def test_input_arrays_bad_dtype(client: TensorSocketClient, dtype: npt.DTypeLike) -> None:
    with pytest.raises(ValueError, match="little-endian bool, integer, float and complex tensors only"):
        client.input_arrays("linear", shapes={"x": [1, 4]}, dtypes={"x": dtype})


def test_input_arrays_without_shared_memory(server: TensorSocketServer) -> None:
    with TensorSocketClient(server.socket_path, timeout_s=10, shared_memory=False) as inline:
        arrays = inline.input_arrays("linear", shapes={"x": LARGE.shape})
        arrays["x"][...] = LARGE
        reply = inline.infer("linear", arrays)

    np.testing.assert_allclose(reply.outputs["y"], linear_reference(LARGE), rtol=1e-5)
    assert arrays["x"].flags.owndata


def test_input_arrays_after_growth(client: TensorSocketClient) -> None:
    """Arrays of a region that a larger one replaced stay valid, and infer copies them into the new one."""
    arrays = client.input_arrays("linear", shapes={"x": LARGE.shape})
    arrays["x"][...] = LARGE
    client.infer("linear", {"x": np.zeros((200_000, 4), np.float32)})  # 3.2 MB: a larger region

    reply = client.infer("linear", arrays)

    np.testing.assert_allclose(reply.outputs["y"], linear_reference(LARGE), rtol=1e-5)
    assert client.copied_input_bytes == 200_000 * 16 + LARGE.nbytes


def test_input_arrays_after_close(server: TensorSocketServer) -> None:
    """Closing the client leaves the region mapped while its arrays live, so they neither crash nor change."""
    tensor_client = TensorSocketClient(server.socket_path, timeout_s=10)
    arrays = tensor_client.input_arrays("linear", shapes={"x": LARGE.shape})
    arrays["x"][...] = LARGE
    view = arrays["x"][10:20]
    tensor_client.close()
    del arrays
    view[0, 0] = 42.0

    assert view[0, 0] == 42.0
    np.testing.assert_array_equal(view[1:], LARGE[11:20])


def test_input_arrays_after_reconnect(host: ModelHost, tmp_path: Path) -> None:
    path = tmp_path / "agent.tensor.sock"
    first = TensorSocketServer(host, path)
    first.start()
    with TensorSocketClient(path, timeout_s=10) as tensor_client:
        arrays = tensor_client.input_arrays("linear", shapes={"x": LARGE.shape})
        arrays["x"][...] = LARGE
        tensor_client.infer("linear", arrays)
        first.stop()
        second = TensorSocketServer(host, path)
        second.start()
        try:
            reply = tensor_client.infer("linear", arrays)
        finally:
            second.stop()

    np.testing.assert_allclose(reply.outputs["y"], linear_reference(LARGE), rtol=1e-5)
    assert tensor_client.copied_input_bytes == LARGE.nbytes


def shared_region(sock: socket.socket, size: int) -> mmap.mmap:
    """Ask the agent on sock for a shared region of size bytes and map it."""
    write_frame(sock, {"op": "shm", "bytes": size})
    frame, fds = FrameReader(sock).read_with_fds()
    try:
        assert frame is not None and frame[0]["ok"], frame
        return mmap.mmap(fds[0], size)
    finally:
        for fd in fds:
            os.close(fd)


def shared_infer_header(output_offset: object) -> dict[str, object]:
    entry = {"name": "x", "dtype": "float32", "shape": [2, 4]}
    return {"op": "infer", "model": "linear", "shm": True, "inputs": [entry], "output_offset": output_offset}


def test_output_offset_used(server: TensorSocketServer) -> None:
    with raw_connection(server) as sock:
        region = shared_region(sock, 4096)
        region[:32] = BATCH.tobytes()
        write_frame(sock, shared_infer_header(1024))
        frame = read_frame(sock)
        outputs = np.frombuffer(region, np.float32, count=6, offset=1024).reshape(2, 3).copy()
        inputs = np.frombuffer(region, np.float32, count=8).reshape(2, 4).copy()
        region.close()

    assert frame is not None
    assert (frame[0]["shm"], frame[0]["output_offset"]) == (True, 1024)
    np.testing.assert_allclose(outputs, linear_reference(BATCH), rtol=1e-5)
    np.testing.assert_array_equal(inputs, BATCH)


def test_output_offset_past_region(server: TensorSocketServer) -> None:
    """Outputs that do not fit in the region after output_offset come in the payload."""
    with raw_connection(server) as sock:
        region = shared_region(sock, 4096)
        region[:32] = BATCH.tobytes()
        write_frame(sock, shared_infer_header(4090))
        frame = read_frame(sock)
        region.close()

    assert frame is not None
    assert frame[0]["shm"] is False
    assert "output_offset" not in frame[0]
    np.testing.assert_allclose(np.frombuffer(frame[1], np.float32).reshape(2, 3), linear_reference(BATCH), rtol=1e-5)


@pytest.mark.parametrize("output_offset", [-1, True, "8"])
def test_output_offset_invalid(server: TensorSocketServer, output_offset: object) -> None:
    with raw_connection(server) as sock:
        region = shared_region(sock, 4096)
        write_frame(sock, shared_infer_header(output_offset))
        frame = read_frame(sock)
        region.close()

    assert frame is not None
    assert frame[0]["code"] == "INVALID_ARGUMENT"
    assert frame[0]["message"].startswith("'output_offset' must be a byte offset of 0 or more, got")


def test_agent_without_output_offset(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An agent without output_offset writes the outputs at the start of the region; the client reads them there."""
    path = tmp_path / "agent.tensor.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def older_agent() -> None:
        conn, _ = listener.accept()
        region: mmap.mmap | None = None
        with conn:
            reader = FrameReader(conn)
            while (frame := reader.read()) is not None:
                if frame[0]["op"] == "shm":
                    fd = os.memfd_create("test-region")
                    os.ftruncate(fd, frame[0]["bytes"])
                    region = mmap.mmap(fd, frame[0]["bytes"])
                    header = json.dumps({"ok": True, "bytes": frame[0]["bytes"]}).encode()
                    socket.send_fds(conn, [struct.pack("<4sIQ", MAGIC, len(header), 0) + header], [fd])
                    os.close(fd)
                    continue
                assert region is not None
                total = np.frombuffer(region, np.float32, count=2048 * 4).sum(dtype=np.float32)
                region[:4] = np.float32(total).tobytes()
                reply = {"ok": True, "model_name": "sum", "model_version": "1", "variant_id": "v", "latency_ms": 1.0}
                write_frame(conn, {**reply, "shm": True, "outputs": [{"name": "y", "dtype": "float32", "shape": [1]}]})

    thread = threading.Thread(target=older_agent, daemon=True)
    thread.start()
    with (
        caplog.at_level(logging.WARNING, logger="edgefleet.agent.tensor_socket"),
        TensorSocketClient(path, timeout_s=10) as older,
    ):
        arrays = older.input_arrays("sum", shapes={"x": [2048, 4]}, dtypes={"x": np.float32})
        arrays["x"][...] = 1.0
        reply = older.infer("sum", arrays)
        del arrays
    thread.join(10)
    listener.close()

    assert reply.outputs["y"][0] == 8192.0
    assert any("ignores 'output_offset'" in record.getMessage() for record in caplog.records)


def test_poll_frame_none() -> None:
    left, right = socket.socketpair()
    with left, right:
        assert FrameReader(right).poll_frame(0.001) is False


def test_poll_frame_buffers() -> None:
    left, right = socket.socketpair()
    with left, right:
        write_frame(left, {"op": "models"})
        reader = FrameReader(right)
        arrived = reader.poll_frame(0.1)
        left.close()
        frame = reader.read()

    assert arrived is True
    assert frame is not None
    assert frame[0] == {"op": "models"}


def test_hybrid_poll_matches(server: TensorSocketServer) -> None:
    with TensorSocketClient(server.socket_path, timeout_s=10, hybrid_poll=True) as polling:
        replies = [polling.infer("linear", {"x": LARGE}) for _ in range(20)]

    for reply in replies:
        np.testing.assert_allclose(reply.outputs["y"], linear_reference(LARGE), rtol=1e-5)


def test_hybrid_poll_slow_reply(tmp_path: Path) -> None:
    """A reply later than the poll bound arrives through the blocking read, and the calls after it still work."""
    path = tmp_path / "agent.tensor.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    delays = [0.0, 0.0, 0.0, 0.05, 0.0, 0.0, 0.05, 0.0, 0.0, 0.0]

    def agent() -> None:
        conn, _ = listener.accept()
        with conn:
            reader = FrameReader(conn)
            for delay in delays:
                if reader.read() is None:
                    return
                time.sleep(delay)
                reply = {"ok": True, "model_name": "m", "model_version": "1", "variant_id": "v", "latency_ms": delay}
                write_frame(conn, {**reply, "outputs": []})

    thread = threading.Thread(target=agent, daemon=True)
    thread.start()
    with TensorSocketClient(path, timeout_s=10, shared_memory=False, hybrid_poll=True) as polling:
        latencies = [polling.infer("m", {"x": BATCH}).latency_ms for _ in delays]
    thread.join(10)
    listener.close()

    assert latencies == delays


def zero_copy_inputs(client: TensorSocketClient, data: np.ndarray = LARGE) -> dict[str, np.ndarray]:
    arrays = client.input_arrays("linear", shapes={"x": data.shape})
    arrays["x"][...] = data
    return arrays


def prepared_calls(client: TensorSocketClient) -> int:
    assert client._connection is not None
    return len(client._connection.prepared)


def test_repeated_call_prepared(client: TensorSocketClient) -> None:
    """A repeated zero-copy call takes the prepared path and still reads the inputs written between calls."""
    arrays = zero_copy_inputs(client)
    first = client.infer("linear", arrays)
    arrays["x"][...] = LARGE[::-1]

    second = client.infer("linear", arrays)

    assert prepared_calls(client) == 1
    np.testing.assert_allclose(first.outputs["y"], linear_reference(LARGE), rtol=1e-5)
    np.testing.assert_allclose(second.outputs["y"], linear_reference(LARGE[::-1]), rtol=1e-5)
    assert second.latency_ms > 0
    assert (second.model_name, second.model_version, second.variant_id) == ("linear", "1", "linear:1:source")
    assert client.copied_input_bytes == 0


def test_prepared_outputs_are_copies(client: TensorSocketClient) -> None:
    arrays = zero_copy_inputs(client)
    client.infer("linear", arrays)
    earlier = client.infer("linear", arrays).outputs["y"]
    arrays["x"][...] = 0.0

    client.infer("linear", arrays)

    np.testing.assert_allclose(earlier, linear_reference(LARGE), rtol=1e-5)


def test_prepared_after_hot_swap(host: ModelHost, client: TensorSocketClient, tmp_path: Path) -> None:
    """A new model version changes the reply header, so the prepared call reads it in full and prepares again."""
    arrays = zero_copy_inputs(client)
    client.infer("linear", arrays)
    client.infer("linear", arrays)
    host.install("linear", "2", "linear:2:source", onnx_linear(tmp_path / "linear2.onnx", seed=7), "onnx")

    swapped = client.infer("linear", arrays)
    again = client.infer("linear", arrays)

    assert (swapped.model_version, again.model_version) == ("2", "2")
    np.testing.assert_allclose(swapped.outputs["y"], linear_reference(LARGE, seed=7), rtol=1e-5)
    np.testing.assert_allclose(again.outputs["y"], linear_reference(LARGE, seed=7), rtol=1e-5)
    assert prepared_calls(client) == 1


def test_prepared_model_removed(host: ModelHost, client: TensorSocketClient, tmp_path: Path) -> None:
    arrays = zero_copy_inputs(client)
    client.infer("linear", arrays)
    host.remove("linear")

    with pytest.raises(TensorSocketError) as error:
        client.infer("linear", arrays)

    assert error.value.code == "NOT_FOUND"
    assert prepared_calls(client) == 0
    host.install("linear", "3", "linear:3:source", onnx_linear(tmp_path / "linear3.onnx"), "onnx")
    assert client.infer("linear", arrays).model_version == "3"


def test_prepared_skips_other_arrays(client: TensorSocketClient) -> None:
    """An array outside the region with the same shape is copied in, not mistaken for the prepared input."""
    arrays = zero_copy_inputs(client)
    client.infer("linear", arrays)
    client.infer("linear", arrays)
    other = LARGE[::-1].copy()

    reply = client.infer("linear", {"x": other})

    np.testing.assert_allclose(reply.outputs["y"], linear_reference(other), rtol=1e-5)
    assert client.copied_input_bytes == LARGE.nbytes


def test_prepared_view_of_other_shape(client: TensorSocketClient) -> None:
    """A view at the same address with fewer rows is another call, and the agent receives only those rows."""
    arrays = zero_copy_inputs(client)
    client.infer("linear", arrays)

    reply = client.infer("linear", {"x": arrays["x"][:1024]})

    np.testing.assert_allclose(reply.outputs["y"], linear_reference(LARGE[:1024]), rtol=1e-5)
    assert reply.outputs["y"].shape == (1024, 3)


@pytest.mark.parametrize(("spin_s", "expected"), [(10.0, [None, None]), (1e-9, [None, 0.0])])
def test_reply_poll_follows_run_time(
    client: TensorSocketClient, monkeypatch: pytest.MonkeyPatch, spin_s: float, expected: list[float | None]
) -> None:
    """The client polls for a reply only while the model's last run was shorter than the poll."""
    client.models()  # The client connects on its first call.
    assert client._connection is not None
    reader = client._connection.reader
    reader.spin_s = spin_s
    polls: list[float | None] = []
    read_raw = reader.read_raw

    def recording_read_raw(spin_s: float | None = None) -> tuple[bytes, bytearray] | None:
        polls.append(spin_s)
        return read_raw(spin_s)

    monkeypatch.setattr(reader, "read_raw", recording_read_raw)

    for _ in range(2):
        client.infer("linear", {"x": BATCH})

    assert polls == expected


def onnx_nonzero(path: Path) -> Path:
    """Write y = NonZero(x) for x float32 (batch, 4): the output shape follows the values."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("NonZero", ["x"], ["y"])],
        "nonzero",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [2, "count"])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_prepared_output_shape_changes(host: ModelHost, client: TensorSocketClient, tmp_path: Path) -> None:
    """A repeated request whose outputs change shape gets a full reply with the new shape."""
    host.install("nonzero", "1", "nonzero:1:source", onnx_nonzero(tmp_path / "nonzero.onnx"), "onnx")
    arrays = client.input_arrays("nonzero", shapes={"x": LARGE.shape})
    arrays["x"][...] = 0.0
    shapes = []
    for count in (3, 3, 5, 5):
        arrays["x"][:count, 0] = 1.0
        reply = client.infer("nonzero", arrays)
        shapes.append(reply.outputs["y"].shape)
        np.testing.assert_array_equal(reply.outputs["y"], np.stack(np.nonzero(arrays["x"])))

    assert shapes == [(2, 3), (2, 3), (2, 5), (2, 5)]
    assert client.copied_input_bytes == 0


class SwapDuringPrepare(ModelHost):
    """A ModelHost that installs another version of a model between a call and its prepare."""

    def __init__(self, swap: Callable[[], object]) -> None:
        super().__init__(default_threads=1)
        self.swap: Callable[[], object] | None = swap

    def prepare(self, name: str, feeds: Mapping[str, np.ndarray]) -> PreparedInference | None:
        swap, self.swap = self.swap, None
        if swap is not None:
            swap()
        return super().prepare(name, feeds)


def test_prepared_swap_before_prepare(tmp_path: Path) -> None:
    """A version installed between a call and its prepare is named in the replies that it computes."""
    new_model = onnx_linear(tmp_path / "linear2.onnx", seed=7)

    def install_version_2() -> None:
        swapping.install("linear", "2", "linear:2:source", new_model, "onnx")

    swapping = SwapDuringPrepare(install_version_2)
    swapping.install("linear", "1", "linear:1:source", onnx_linear(tmp_path / "linear.onnx"), "onnx")
    swapping_server = TensorSocketServer(swapping, tmp_path / "agent.tensor.sock")
    swapping_server.start()
    try:
        with TensorSocketClient(swapping_server.socket_path, timeout_s=10) as swapped_client:
            arrays = zero_copy_inputs(swapped_client)
            first = swapped_client.infer("linear", arrays)
            second = swapped_client.infer("linear", arrays)
    finally:
        swapping_server.stop()
        swapping.close()

    assert first.model_version == "1"
    np.testing.assert_allclose(second.outputs["y"], linear_reference(LARGE, seed=7), rtol=1e-5)
    assert (second.model_version, second.variant_id) == ("2", "linear:2:source")
