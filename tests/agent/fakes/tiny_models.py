"""Builders of the one-node models that edgefleet.agent.probe_runtimes embeds as bytes."""

from __future__ import annotations

import flatbuffers  # type: ignore[import-untyped]
import onnx
from ai_edge_litert import schema_py_generated as tflite_schema
from onnx import helper


def build_tiny_onnx_model() -> bytes:
    """Build y = x + x on float32[1] with opset 13 and IR version 7, the bytes of TINY_ONNX_MODEL."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="edgefleet", ir_version=7
    )
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def _float_tensor(name: str) -> tflite_schema.TensorT:
    tensor = tflite_schema.TensorT()
    tensor.name = name.encode()
    tensor.shape = [1]
    tensor.type = tflite_schema.TensorType.FLOAT32
    tensor.buffer = 0
    return tensor


def build_tiny_tflite_model() -> bytes:
    """Build y = x + x on float32[1] as a schema-3 TFLite flatbuffer, the bytes of TINY_TFLITE_MODEL."""
    operator = tflite_schema.OperatorT()
    operator.opcodeIndex = 0
    operator.inputs = [0, 0]
    operator.outputs = [1]
    operator.builtinOptionsType = tflite_schema.BuiltinOptions.AddOptions
    operator.builtinOptions = tflite_schema.AddOptionsT()

    subgraph = tflite_schema.SubGraphT()
    subgraph.name = b"main"
    subgraph.tensors = [_float_tensor("x"), _float_tensor("y")]
    subgraph.inputs = [0]
    subgraph.outputs = [1]
    subgraph.operators = [operator]

    operator_code = tflite_schema.OperatorCodeT()
    operator_code.builtinCode = tflite_schema.BuiltinOperator.ADD
    operator_code.deprecatedBuiltinCode = tflite_schema.BuiltinOperator.ADD
    operator_code.version = 1

    model = tflite_schema.ModelT()
    model.version = 3
    model.description = b"edgefleet"
    model.buffers = [tflite_schema.BufferT()]  # Buffer 0 is the empty sentinel the schema requires.
    model.subgraphs = [subgraph]
    model.operatorCodes = [operator_code]

    builder = flatbuffers.Builder(0)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
