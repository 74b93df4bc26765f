"""Read the interface, parameters, MACs and activation memory of an ONNX model."""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError
from onnx import helper, shape_inference

from edgefleet.common.models import SERVED_DTYPES, ModelMetadata, TensorSpec
from edgefleet.orchestrator.modelinfo import (
    ModelFileError,
    check_tensor_elements,
    estimate_peak_activation_bytes,
    not_a_model_error,
    propagate_constants,
)

logger = logging.getLogger(__name__)

# onnxruntime only guarantees support for default-domain opset 7 and later. It logs a warning when
# it loads an older model, and it has no kernels for many of the old operator versions.
ORT_MIN_OPSET = 7

_DEFAULT_DOMAINS = ("", "ai.onnx")
# Inputs of quantized operators that hold a scale or a zero point rather than weights.
_QUANTIZATION_PARAMETER_INPUTS: dict[str, tuple[int, ...]] = {
    "QuantizeLinear": (1, 2),
    "DequantizeLinear": (1, 2),
    "QLinearConv": (1, 2, 4, 5, 6, 7),
    "QLinearMatMul": (1, 2, 4, 5, 6, 7),
    "ConvInteger": (2, 3),
    "MatMulInteger": (2, 3),
    "QGemm": (1, 2, 4, 5, 7, 8),  # com.microsoft: A, a_scale, a_zp, B, b_scale, b_zp, C, y_scale, y_zp.
}
# Operators that only exist in quantized graphs: their presence makes a model int8.
_QUANTIZED_OPS = frozenset(
    {"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "QLinearAdd", "QLinearMul"}
)
_INTEGER_WEIGHT_TYPES = frozenset(
    {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
)
_FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
)

Shape = tuple[int, ...]


@dataclass(frozen=True)
class _TensorInfo:
    elem_type: int
    shape: Shape | None  # None when the rank is unknown; unknown dimensions are -1.


def inspect_onnx(content: bytes, source: str) -> ModelMetadata:
    """Parse and check an ONNX model and estimate its cost; raise ModelFileError if it is unusable."""
    model = _parse_model(content, source)
    _use_empty_default_domain(model)
    opset = _default_opset(model, source)
    _check_opset_supported(opset, source)
    _check_operator_domains(model, source)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as error:
        raise ModelFileError(f"ONNX model {source} failed onnx.checker: {error}") from error

    graph = model.graph
    initializer_names = {tensor.name for tensor in graph.initializer}
    initializer_names.update(sparse.values.name for sparse in graph.sparse_initializer)
    inputs = tuple(_tensor_spec(value) for value in graph.input if value.name not in initializer_names)
    outputs = tuple(_tensor_spec(value) for value in graph.output)
    for kind, specs in (("input", inputs), ("output", outputs)):
        for spec in specs:
            _check_served_dtype(kind, spec, source)
    for spec in (*inputs, *outputs):
        check_tensor_elements(spec.name, spec.shape, source)

    tensors = _infer_static_shapes(model, initializer_names, source)
    for name, info in tensors.items():
        if info.shape is not None:
            check_tensor_elements(name, info.shape, source)
    constants = _constants(graph)
    macs_by_op_type: dict[str, int] = {}
    for node in graph.node:
        estimate = _MAC_ESTIMATORS.get(node.op_type)
        if estimate is None:
            continue
        macs = estimate(node, tensors)
        if macs:
            macs_by_op_type[node.op_type] = macs_by_op_type.get(node.op_type, 0) + macs

    return ModelMetadata(
        format="onnx",
        inputs=inputs,
        outputs=outputs,
        opset=opset,
        parameters=_count_parameters(graph, constants),
        macs=sum(macs_by_op_type.values()),
        peak_activation_bytes=_peak_activation_bytes(graph, initializer_names, tensors),
        macs_by_op_type=macs_by_op_type,
        precision=_precision(graph, constants),
        layers=len(graph.node),
    )


@functools.cache
def supported_opset_range() -> tuple[int, int]:
    """Return the (min, max) default-domain opset that the installed onnxruntime and onnx can load.

    The maximum is the newest operator version among the schemas compiled into onnxruntime, capped
    by the newest opset of the onnx package used for checking and shape inference.
    """
    from onnxruntime.capi import onnxruntime_pybind11_state

    newest = max(
        schema.since_version
        for schema in onnxruntime_pybind11_state.get_all_operator_schema()
        if schema.domain in _DEFAULT_DOMAINS
    )
    return ORT_MIN_OPSET, min(newest, onnx.defs.onnx_opset_version())


@functools.cache
def runtime_operator_domains() -> frozenset[str]:
    """Return the operator domains that the installed onnxruntime registers schemas for, with "ai.onnx".

    onnxruntime 1.32 registers "" (ai.onnx), ai.onnx.ml, com.microsoft, com.microsoft.nchwc and
    com.ms.internal.nhwc; other builds may register more or fewer.
    """
    from onnxruntime.capi import onnxruntime_pybind11_state

    return frozenset(
        {*_DEFAULT_DOMAINS, *(schema.domain for schema in onnxruntime_pybind11_state.get_all_operator_schema())}
    )


@functools.cache
def runtime_operators() -> frozenset[tuple[str, str]]:
    """Return the (domain, op_type) pairs that the installed onnxruntime registers schemas for."""
    from onnxruntime.capi import onnxruntime_pybind11_state

    return frozenset((schema.domain, schema.name) for schema in onnxruntime_pybind11_state.get_all_operator_schema())


def _check_operator_domains(model: onnx.ModelProto, source: str) -> None:
    """Raise ModelFileError naming the first node whose operator onnxruntime does not register.

    That is a node of an unknown domain, or of an operator that a known domain other than ai.onnx
    lacks (onnx.checker checks ai.onnx operators). Nodes that call one of the model's own functions
    are allowed, because onnxruntime inlines them. Subgraphs (If, Loop, Scan bodies) and function
    bodies are checked too.
    """
    known = runtime_operator_domains()
    operators = runtime_operators()
    local_functions = {(function.domain, function.name) for function in model.functions}
    graphs: list[tuple[str, Sequence[onnx.NodeProto]]] = [("the main graph", model.graph.node)]
    graphs.extend((f"function {function.domain}:{function.name}", function.node) for function in model.functions)
    while graphs:
        where, nodes = graphs.pop()
        for node in nodes:
            if (node.domain, node.op_type) in local_functions or node.domain in _DEFAULT_DOMAINS:
                pass
            elif node.domain not in known:
                import onnxruntime

                shown_known = ", ".join(sorted({domain or "ai.onnx" for domain in known}))
                raise ModelFileError(
                    f"ONNX model {source}: node {_node_name(node)} (op_type {node.op_type}, in {where}) uses "
                    f"operator domain {node.domain!r}, which onnxruntime {onnxruntime.__version__} does not "
                    f"provide, so devices cannot load the model (known domains: {shown_known}); replace the "
                    "custom operator with standard ONNX operators and upload again"
                )
            elif (node.domain, node.op_type) not in operators:
                import onnxruntime

                raise ModelFileError(
                    f"ONNX model {source}: node {_node_name(node)} (in {where}) uses operator "
                    f"{node.domain}:{node.op_type}, which onnxruntime {onnxruntime.__version__} does not provide, "
                    "so devices cannot load the model; check the op_type's spelling, or replace the operator "
                    "with standard ONNX operators, and upload again"
                )
            for attribute in node.attribute:
                subgraphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs
                for subgraph in subgraphs:
                    graphs.append((f"subgraph {attribute.name} of node {_node_name(node)}", subgraph.node))


def _use_empty_default_domain(model: onnx.ModelProto) -> None:
    """Rename the default domain "ai.onnx" to "" in the model's nodes and opset imports, in place.

    onnxruntime 1.32 loads either name as the default domain, but onnx 1.23's checker and shape inference
    reject "ai.onnx". Only the parsed model changes, and the stored file keeps its bytes.
    """
    opset_lists = [model.opset_import, *(function.opset_import for function in model.functions)]
    for opset_imports in opset_lists:
        versions = {entry.domain: entry.version for entry in opset_imports}
        if "ai.onnx" not in versions:
            continue
        kept = [entry for entry in opset_imports if entry.domain != "ai.onnx"]
        if "" not in versions:
            kept.append(onnx.helper.make_opsetid("", versions["ai.onnx"]))
        del opset_imports[:]
        opset_imports.extend(kept)
    graphs: list[Sequence[onnx.NodeProto]] = [model.graph.node, *(function.node for function in model.functions)]
    while graphs:
        for node in graphs.pop():
            if node.domain == "ai.onnx":
                node.domain = ""
            for attribute in node.attribute:
                subgraphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs
                graphs.extend(subgraph.node for subgraph in subgraphs)


def _node_name(node: onnx.NodeProto) -> str:
    """Return a node's name quoted, or for an unnamed node its first output."""
    if node.name:
        return repr(node.name)
    return f"with output {node.output[0]!r}" if node.output else "(unnamed)"


def _parse_model(content: bytes, source: str) -> onnx.ModelProto:
    layout = _scan_model_fields(content)
    if layout == "invalid":
        raise not_a_model_error(source)
    if layout == "truncated":
        raise ModelFileError(
            f"ONNX model {source} is truncated: a field runs past the end of its {len(content)} bytes; "
            "upload the complete file"
        )
    model = onnx.ModelProto()
    try:
        model.ParseFromString(content)
    except DecodeError as error:
        raise ModelFileError(
            f"ONNX model {source} is corrupt or truncated: protobuf parsing failed ({error}); upload the complete file"
        ) from error
    if not model.HasField("graph"):
        raise not_a_model_error(source)
    return model


# Protobuf wire types: 0 varint, 1 64-bit, 2 length-delimited, 5 32-bit.
_WIRE_TYPES = {
    FieldDescriptor.TYPE_MESSAGE: 2,
    FieldDescriptor.TYPE_STRING: 2,
    FieldDescriptor.TYPE_BYTES: 2,
    FieldDescriptor.TYPE_INT64: 0,
    FieldDescriptor.TYPE_INT32: 0,
}


def _scan_model_fields(content: bytes) -> str:
    """Walk the top-level protobuf fields of content as a ModelProto.

    Returns "invalid" when a field number or wire type does not belong to ModelProto (the bytes are
    not ONNX), "truncated" when at least one field was read and a later one runs past the end, and
    "complete" otherwise. Nested messages are left to the protobuf parser.
    """
    expected = {field.number: _WIRE_TYPES.get(field.type) for field in onnx.ModelProto.DESCRIPTOR.fields}
    position = 0
    fields_read = 0
    end = len(content)
    while position < end:
        tag, position = _read_varint(content, position)
        if tag is None:
            return "truncated" if fields_read else "invalid"
        number, wire_type = tag >> 3, tag & 7
        if expected.get(number) != wire_type:
            return "invalid"
        if wire_type == 0:
            value, position = _read_varint(content, position)
            if value is None:
                return "truncated" if fields_read else "invalid"
        else:
            length, position = _read_varint(content, position)
            if length is None or position + length > end:
                return "truncated" if fields_read else "invalid"
            position += length
        fields_read += 1
    return "complete"


def _read_varint(content: bytes, position: int) -> tuple[int | None, int]:
    value = 0
    for shift in range(0, 70, 7):
        if position >= len(content):
            return None, position
        byte = content[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
    return None, position


def _default_opset(model: onnx.ModelProto, source: str) -> int:
    for entry in model.opset_import:
        if entry.domain in _DEFAULT_DOMAINS:
            return int(entry.version)
    raise ModelFileError(
        f"ONNX model {source} has no opset_import for the default domain; the file may be truncated, "
        "or re-export it with an explicit opset"
    )


def _check_opset_supported(opset: int, source: str) -> None:
    low, high = supported_opset_range()
    if not low <= opset <= high:
        import onnxruntime

        raise ModelFileError(
            f"ONNX model {source} uses opset {opset}, outside the range {low} to {high} that onnxruntime "
            f"{onnxruntime.__version__} supports; re-export it with an opset in that range "
            "(torch.onnx.export(..., opset_version=N))"
        )


# Names of the ONNX value types other than a tensor, as TypeProto's "value" oneof spells them.
_VALUE_KINDS = {
    "sequence_type": "a sequence",
    "map_type": "a map",
    "optional_type": "an optional value",
    "sparse_tensor_type": "a sparse tensor",
}


def _check_served_dtype(kind: str, spec: TensorSpec, source: str) -> None:
    """Raise ModelFileError for an input or output that agents cannot serve: not a tensor, or a string tensor."""
    if spec.dtype in SERVED_DTYPES:
        return
    if spec.dtype in _VALUE_KINDS:
        found = f"is {_VALUE_KINDS[spec.dtype]}, not a tensor"
    else:
        found = f"has dtype {'string' if spec.dtype == 'object' else spec.dtype}"
    raise ModelFileError(
        f"ONNX model {source}: {kind} {spec.name!r} {found}; agents serve only tensors of "
        f"{', '.join(SERVED_DTYPES)}. Re-export the model so that every input and output is such a tensor"
    )


def _dtype_name(elem_type: int) -> str:
    try:
        return str(helper.tensor_dtype_to_np_dtype(elem_type).name)
    except (KeyError, ValueError, TypeError):
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def _itemsize(elem_type: int) -> int:
    try:
        return int(helper.tensor_dtype_to_np_dtype(elem_type).itemsize)
    except (KeyError, ValueError, TypeError):
        return 0


def _tensor_spec(value: onnx.ValueInfoProto) -> TensorSpec:
    if not value.type.HasField("tensor_type"):
        return TensorSpec(name=value.name, dtype=value.type.WhichOneof("value") or "", shape=())
    tensor_type = value.type.tensor_type
    shape: list[int] = []
    names: list[str] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            shape.append(int(dim.dim_value))
            names.append("")
        else:
            shape.append(-1)
            names.append(dim.dim_param)
    return TensorSpec(
        name=value.name,
        dtype=_dtype_name(tensor_type.elem_type),
        shape=tuple(shape),
        dim_names=tuple(names),
    )


def _infer_static_shapes(model: onnx.ModelProto, initializer_names: set[str], source: str) -> dict[str, _TensorInfo]:
    """Run shape inference with every dynamic input axis set to 1 and collect every tensor's type."""
    static = onnx.ModelProto()
    static.CopyFrom(model)
    for value in static.graph.input:
        if value.name in initializer_names or not value.type.HasField("tensor_type"):
            continue
        for dim in value.type.tensor_type.shape.dim:
            if not dim.HasField("dim_value"):
                dim.dim_value = 1
    try:
        inferred = shape_inference.infer_shapes(static, data_prop=True)
    except shape_inference.InferenceError as error:
        raise ModelFileError(f"ONNX model {source} failed shape inference: {error}") from error

    tensors: dict[str, _TensorInfo] = {}
    graph = inferred.graph
    for value in (*graph.input, *graph.value_info, *graph.output):
        if value.type.HasField("tensor_type"):
            tensor_type = value.type.tensor_type
            shape: Shape | None = None
            if tensor_type.HasField("shape"):
                shape = tuple(int(dim.dim_value) if dim.HasField("dim_value") else -1 for dim in tensor_type.shape.dim)
            tensors[value.name] = _TensorInfo(tensor_type.elem_type, shape)
    for tensor in graph.initializer:
        tensors[tensor.name] = _TensorInfo(tensor.data_type, tuple(int(d) for d in tensor.dims))
    return tensors


def _shape(tensors: Mapping[str, _TensorInfo], name: str) -> Shape | None:
    info = tensors.get(name)
    if info is None or info.shape is None:
        return None
    # NOTE: axes that stay unknown after inference (data-dependent sizes) count as 1.
    return tuple(d if d > 0 else 1 for d in info.shape)


def _input(node: onnx.NodeProto, index: int) -> str:
    return node.input[index] if index < len(node.input) else ""


def _conv_macs(weight_index: int) -> Callable[[onnx.NodeProto, Mapping[str, _TensorInfo]], int]:
    """Build a Conv estimator: every output element costs (C_in / groups) * prod(kernel) MACs."""

    def estimate(node: onnx.NodeProto, tensors: Mapping[str, _TensorInfo]) -> int:
        output = _shape(tensors, node.output[0])
        weight = _shape(tensors, _input(node, weight_index))
        if output is None or weight is None or len(weight) < 2:
            return _unknown(node)
        return math.prod(output) * math.prod(weight[1:])

    return estimate


def _conv_transpose_macs(node: onnx.NodeProto, tensors: Mapping[str, _TensorInfo]) -> int:
    """Estimate ConvTranspose: every input element is scattered to (C_out / groups) * prod(kernel) outputs."""
    data = _shape(tensors, node.input[0])
    weight = _shape(tensors, _input(node, 1))  # (C_in, C_out / groups, k1, k2, ...)
    if data is None or weight is None or len(weight) < 2:
        return _unknown(node)
    return math.prod(data) * math.prod(weight[1:])


def _matmul_macs(a_index: int) -> Callable[[onnx.NodeProto, Mapping[str, _TensorInfo]], int]:
    """Build a MatMul estimator: every output element costs K MACs, K being the last axis of A."""

    def estimate(node: onnx.NodeProto, tensors: Mapping[str, _TensorInfo]) -> int:
        output = _shape(tensors, node.output[0])
        a = _shape(tensors, _input(node, a_index))
        if output is None or a is None or not a:
            return _unknown(node)
        return math.prod(output) * a[-1]

    return estimate


def _gemm_macs(node: onnx.NodeProto, tensors: Mapping[str, _TensorInfo]) -> int:
    """Estimate Gemm and com.microsoft QGemm as M * N * K, with K read from A after its optional transpose."""
    output = _shape(tensors, node.output[0])
    a = _shape(tensors, node.input[0])
    if output is None or a is None or len(a) != 2:
        return _unknown(node)
    trans_a = next((attribute.i for attribute in node.attribute if attribute.name == "transA"), 0)
    return math.prod(output) * (a[0] if trans_a else a[1])


def _unknown(node: onnx.NodeProto) -> int:
    logger.debug("no MAC estimate for %s node %r: a shape is unknown", node.op_type, node.name)
    return 0


_MAC_ESTIMATORS: dict[str, Callable[[onnx.NodeProto, Mapping[str, _TensorInfo]], int]] = {
    "Conv": _conv_macs(1),
    "ConvInteger": _conv_macs(1),
    "QLinearConv": _conv_macs(3),
    "ConvTranspose": _conv_transpose_macs,
    "Gemm": _gemm_macs,
    "QGemm": _gemm_macs,
    "MatMul": _matmul_macs(0),
    "MatMulInteger": _matmul_macs(0),
    "QLinearMatMul": _matmul_macs(0),
}


_CONSTANT_TYPES = {
    "value_float": onnx.TensorProto.FLOAT,
    "value_floats": onnx.TensorProto.FLOAT,
    "value_int": onnx.TensorProto.INT64,
    "value_ints": onnx.TensorProto.INT64,
}


@dataclass(frozen=True)
class _Constant:
    name: str
    data_type: int
    elements: int


def _constants(graph: onnx.GraphProto) -> list[_Constant]:
    """List the main graph's initializers, sparse initializers and Constant node values.

    Initializers that are also graph inputs (overridable defaults) are listed too: exporters use
    them for weights. Constants inside If, Loop or Scan subgraphs are not listed.
    """
    constants = [_Constant(t.name, t.data_type, math.prod(t.dims)) for t in graph.initializer]
    constants.extend(_Constant(s.values.name, s.values.data_type, math.prod(s.dims)) for s in graph.sparse_initializer)
    for node in graph.node:
        if node.op_type != "Constant" or node.domain not in _DEFAULT_DOMAINS or not node.output:
            continue
        for attribute in node.attribute:
            if attribute.name == "value":
                tensor = attribute.t
                constants.append(_Constant(node.output[0], tensor.data_type, math.prod(tensor.dims)))
            elif attribute.name == "sparse_value":
                sparse = attribute.sparse_tensor
                constants.append(_Constant(node.output[0], sparse.values.data_type, math.prod(sparse.dims)))
            elif attribute.name in ("value_floats", "value_ints"):
                elements = len(attribute.floats) + len(attribute.ints)
                constants.append(_Constant(node.output[0], _CONSTANT_TYPES[attribute.name], elements))
            elif attribute.name in ("value_float", "value_int"):
                constants.append(_Constant(node.output[0], _CONSTANT_TYPES[attribute.name], 1))
    return constants


def _count_parameters(graph: onnx.GraphProto, constants: list[_Constant]) -> int:
    """Count the elements of all constants except quantization scales and zero points.

    Small constants such as Clip bounds or Reshape targets count too.
    """
    quantization_parameters: set[str] = set()
    other_uses: set[str] = set()
    for node in graph.node:
        positions = _QUANTIZATION_PARAMETER_INPUTS.get(node.op_type, ())
        for index, name in enumerate(node.input):
            (quantization_parameters if index in positions else other_uses).add(name)
    skipped = quantization_parameters - other_uses
    return sum(constant.elements for constant in constants if constant.name not in skipped)


def _precision(graph: onnx.GraphProto, constants: list[_Constant]) -> str:
    """Return int8 for QDQ or QOperator quantized graphs, fp16 when most float weights are fp16, else fp32."""
    integer_constants = {c.name for c in constants if c.data_type in _INTEGER_WEIGHT_TYPES}
    for node in graph.node:
        if node.op_type in _QUANTIZED_OPS:
            return "int8"
        if node.op_type == "DequantizeLinear" and node.input[0] in integer_constants:
            return "int8"
    fp16_elements = 0
    other_float_elements = 0
    for constant in constants:
        if constant.data_type == onnx.TensorProto.FLOAT16:
            fp16_elements += constant.elements
        elif constant.data_type in _FLOAT_TYPES:
            other_float_elements += constant.elements
    if fp16_elements > other_float_elements:
        return "fp16"
    return "fp32"


def _peak_activation_bytes(
    graph: onnx.GraphProto, initializer_names: set[str], tensors: Mapping[str, _TensorInfo]
) -> int:
    steps = [([name for name in node.input if name], [name for name in node.output if name]) for node in graph.node]
    constants = propagate_constants(steps, initializer_names)
    sizes: dict[str, int] = {}
    for name, info in tensors.items():
        shape = _shape(tensors, name)
        if shape is not None:
            sizes[name] = math.prod(shape) * _itemsize(info.elem_type)
    return estimate_peak_activation_bytes(
        steps,
        sizes,
        graph_inputs=[value.name for value in graph.input],
        graph_outputs=[value.name for value in graph.output],
        constants=constants,
    )
