"""Write docs/api.md from the comments in protos/edgefleet/v1/*.proto, or check that it is up to date."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PACKAGE_DIR = Path("edgefleet") / "v1"
DOC_PATH = ROOT / "docs" / "api.md"

# Field numbers inside descriptor.proto, which SourceCodeInfo locations use as path elements.
FILE_MESSAGE, FILE_ENUM, FILE_SERVICE, FILE_SYNTAX = 4, 5, 6, 12
MESSAGE_FIELD, MESSAGE_NESTED, MESSAGE_ENUM = 2, 3, 4
ENUM_VALUE = 2
SERVICE_METHOD = 2

SCALAR_NAMES = {
    descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE: "double",
    descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT: "float",
    descriptor_pb2.FieldDescriptorProto.TYPE_INT64: "int64",
    descriptor_pb2.FieldDescriptorProto.TYPE_UINT64: "uint64",
    descriptor_pb2.FieldDescriptorProto.TYPE_INT32: "int32",
    descriptor_pb2.FieldDescriptorProto.TYPE_FIXED64: "fixed64",
    descriptor_pb2.FieldDescriptorProto.TYPE_FIXED32: "fixed32",
    descriptor_pb2.FieldDescriptorProto.TYPE_BOOL: "bool",
    descriptor_pb2.FieldDescriptorProto.TYPE_STRING: "string",
    descriptor_pb2.FieldDescriptorProto.TYPE_BYTES: "bytes",
    descriptor_pb2.FieldDescriptorProto.TYPE_UINT32: "uint32",
    descriptor_pb2.FieldDescriptorProto.TYPE_SFIXED32: "sfixed32",
    descriptor_pb2.FieldDescriptorProto.TYPE_SFIXED64: "sfixed64",
    descriptor_pb2.FieldDescriptorProto.TYPE_SINT32: "sint32",
    descriptor_pb2.FieldDescriptorProto.TYPE_SINT64: "sint64",
}


@dataclass(frozen=True)
class Comments:
    """The comments protoc attached to each declaration, by its SourceCodeInfo path."""

    by_path: dict[tuple[int, ...], str]

    def get(self, *path: int) -> str:
        return self.by_path.get(tuple(path), "")


def load_descriptors(proto_root: Path = PROTO_ROOT) -> list[descriptor_pb2.FileDescriptorProto]:
    """Compile the edgefleet.v1 protos with source info and return their descriptors, sorted by file name.

    Raises RuntimeError when protoc fails or finds no .proto file.
    """
    sources = sorted(str(p.relative_to(proto_root)) for p in (proto_root / PACKAGE_DIR).glob("*.proto"))
    if not sources:
        raise RuntimeError(f"no .proto files under {proto_root / PACKAGE_DIR}")
    include = str(Path(protoc.__file__).parent / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "api.pb"
        args = [
            "protoc",
            f"-I{proto_root}",
            f"-I{include}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *sources,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed; see the messages above")
        descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return sorted(descriptor_set.file, key=lambda f: f.name)


def comments_of(file: descriptor_pb2.FileDescriptorProto) -> Comments:
    """Collect the leading and trailing comments of each declaration, joined into one line of text."""
    by_path: dict[tuple[int, ...], str] = {}
    for location in file.source_code_info.location:
        parts = [location.leading_comments, location.trailing_comments]
        if tuple(location.path) == (FILE_SYNTAX,):
            # The file's header comment sits above `syntax`, detached from it by a blank line or not.
            parts = [*location.leading_detached_comments, *parts]
        text = " ".join(" ".join(line.strip() for line in part.splitlines() if line.strip()) for part in parts)
        if text.strip():
            by_path[tuple(location.path)] = text.strip()
    return Comments(by_path)


def cell(text: str) -> str:
    """Escape text for a Markdown table cell."""
    return text.replace("|", "\\|")


def anchor(name: str) -> str:
    return name.lower()


def type_name(field: descriptor_pb2.FieldDescriptorProto, map_entries: dict[str, str]) -> str:
    """Return the field's type as the proto source writes it, with a link for edgefleet.v1 types."""
    if field.type_name:
        full = field.type_name.lstrip(".")
        if full in map_entries:
            return map_entries[full]
        short = full.removeprefix("edgefleet.v1.")
        base = f"[{short}](#{anchor(short)})" if short != full else f"`{full}`"
    else:
        base = SCALAR_NAMES[field.type]
    if field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED:
        return f"repeated {base}"
    return base


def map_entry_names(files: Iterable[descriptor_pb2.FileDescriptorProto]) -> dict[str, str]:
    """Map the full names of generated map-entry messages to their `map<K, V>` spelling."""
    entries: dict[str, str] = {}
    for file in files:
        for message in file.message_type:
            for nested in message.nested_type:
                if nested.options.map_entry:
                    key, value = nested.field[0], nested.field[1]
                    full = f"{file.package}.{message.name}.{nested.name}"
                    value_name = (
                        value.type_name.lstrip(".").removeprefix(f"{file.package}.") or SCALAR_NAMES[value.type]
                    )
                    entries[full] = f"`map<{SCALAR_NAMES[key.type]}, {value_name}>`"
    return entries


def render_service(
    service: descriptor_pb2.ServiceDescriptorProto, index: int, comments: Comments, source: str
) -> list[str]:
    header = comments.get(FILE_SYNTAX)
    lines = [f"### {service.name}", "", f"Defined in `{source}`" + (f": {header}" if header else ".")]
    summary = comments.get(FILE_SERVICE, index)
    if summary:
        lines += ["", summary]
    lines += ["", "| RPC | request | response | description |", "| --- | --- | --- | --- |"]
    for method_index, method in enumerate(service.method):
        request = method.input_type.removeprefix(".edgefleet.v1.")
        response = method.output_type.removeprefix(".edgefleet.v1.")
        request_text = ("stream " if method.client_streaming else "") + f"[{request}](#{anchor(request)})"
        response_text = ("stream " if method.server_streaming else "") + f"[{response}](#{anchor(response)})"
        description = cell(comments.get(FILE_SERVICE, index, SERVICE_METHOD, method_index))
        lines.append(f"| `{method.name}` | {request_text} | {response_text} | {description} |")
    return [*lines, ""]


def render_message(
    message: descriptor_pb2.DescriptorProto,
    index: int,
    comments: Comments,
    map_entries: dict[str, str],
    source: str,
) -> list[str]:
    lines = [f"### {message.name}", "", f"Defined in `{source}`."]
    summary = comments.get(FILE_MESSAGE, index)
    if summary:
        lines += ["", summary]
    if not message.field:
        return [*lines, "", "No fields.", ""]
    lines += ["", "| field | number | type | description |", "| --- | --- | --- | --- |"]
    for field_index, field in enumerate(message.field):
        description = comments.get(FILE_MESSAGE, index, MESSAGE_FIELD, field_index)
        if field.HasField("oneof_index") and not field.proto3_optional:
            oneof = message.oneof_decl[field.oneof_index].name
            description = f"One of `{oneof}`. {description}".strip()
        lines.append(
            f"| `{field.name}` | {field.number} | {cell(type_name(field, map_entries))} | {cell(description)} |"
        )
    return [*lines, ""]


def render_enum(enum: descriptor_pb2.EnumDescriptorProto, index: int, comments: Comments, source: str) -> list[str]:
    lines = [f"### {enum.name}", "", f"Defined in `{source}`."]
    summary = comments.get(FILE_ENUM, index)
    if summary:
        lines += ["", summary]
    lines += ["", "| value | number | description |", "| --- | --- | --- |"]
    for value_index, value in enumerate(enum.value):
        description = cell(comments.get(FILE_ENUM, index, ENUM_VALUE, value_index))
        lines.append(f"| `{value.name}` | {value.number} | {description} |")
    return [*lines, ""]


def render(files: list[descriptor_pb2.FileDescriptorProto]) -> str:
    """Render the API reference as Markdown: services first, then messages and enums in alphabetical order."""
    map_entries = map_entry_names(files)
    services: list[tuple[str, list[str]]] = []
    messages: list[tuple[str, list[str]]] = []
    enums: list[tuple[str, list[str]]] = []
    for file in files:
        comments = comments_of(file)
        source = f"protos/{file.name}"
        for index, service in enumerate(file.service):
            services.append((service.name, render_service(service, index, comments, source)))
        for index, message in enumerate(file.message_type):
            messages.append((message.name, render_message(message, index, comments, map_entries, source)))
        for index, enum in enumerate(file.enum_type):
            enums.append((enum.name, render_enum(enum, index, comments, source)))

    lines = [
        "# The edgefleet.v1 API",
        "",
        "<!-- Generated by scripts/gen_api_docs.py from protos/edgefleet/v1/*.proto; do not edit by hand. -->",
        "",
        "This reference lists every service, RPC, message, field and enum value of the `edgefleet.v1`",
        "gRPC package with the comment from its `.proto` file. Regenerate it with",
        "`.venv/bin/python scripts/gen_api_docs.py` after changing a proto; `tests/test_docs.py` fails",
        "while it is stale. Field numbers are the wire numbers: new fields go at the end of a message",
        "and no number is ever reused.",
        "",
        "Services: " + ", ".join(f"[{name}](#{anchor(name)})" for name, _ in services) + ".",
        "",
        "## Services",
        "",
    ]
    for _, block in services:
        lines += block
    lines += ["## Messages", ""]
    for _, block in sorted(messages):
        lines += block
    lines += ["## Enums", ""]
    for _, block in sorted(enums):
        lines += block
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md differs from the protos")
    options = parser.parse_args()
    text = render(load_descriptors())
    if options.check:
        if not DOC_PATH.exists() or DOC_PATH.read_text() != text:
            print(f"{DOC_PATH} is out of date; run .venv/bin/python scripts/gen_api_docs.py", file=sys.stderr)
            return 1
        print(f"{DOC_PATH} is up to date")
        return 0
    DOC_PATH.write_text(text)
    print(f"wrote {DOC_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
