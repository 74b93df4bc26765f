"""The model catalog: uploads, listing, variants and artifact downloads."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

from edgefleet.common.errors import (
    AlreadyExists,
    EdgefleetError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from edgefleet.common.models import ModelMetadata
from edgefleet.common.serde import format_from_proto
from edgefleet.orchestrator import serde, validation
from edgefleet.orchestrator.artifacts import (
    UploadAssembler,
    UploadError,
    UploadValidationError,
    sha256_file,
    temp_suffix,
)
from edgefleet.orchestrator.domain import ModelVersion, Variant
from edgefleet.orchestrator.download import DownloadError, iter_chunks
from edgefleet.orchestrator.handlers.devices import MODELS_LISTING, reject_if_removed, suggest
from edgefleet.orchestrator.modelinfo import ModelFileError, inspect_model
from edgefleet.orchestrator.state import OrchestratorState
from edgefleet.orchestrator.store.base import AlreadyExistsError, DeleteBlockedError, NotFoundError
from edgefleet.v1 import agent_pb2, operator_pb2

log = logging.getLogger(__name__)

VARIANT_KIND_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
# The variant kinds an upload may add, by the file format that each kind contains. "source" is the
# uploaded version itself. Compression jobs name their own variants ("int8-JOBID", "tflite-fp16-JOBID")
# with the same kinds, without this check.
UPLOAD_VARIANT_KINDS: dict[str, tuple[str, ...]] = {
    "onnx": ("onnx-fp32", "fp16", "int8", "pruned", "distilled"),
    "tflite": ("tflite-fp32", "tflite-fp16", "tflite-int8"),
}
FORMAT_NAMES = {"onnx": "ONNX", "tflite": "TFLite"}
# Upload kinds whose accuracy can differ from the source's: they are stored as "pending" and stay
# undeployable until a gate job (`edgefleet models compress --gate VARIANT_ID`) measures them. Lower
# precision counts, because a quantizer run elsewhere can be miscalibrated or silently wrong.
# NOTE: fp32 conversions ("onnx-fp32", "tflite-fp32") of the source are accepted unmeasured. A broken
# export of one shows only in its devices' outputs, because no gate measures it.
GATED_UPLOAD_KINDS = ("fp16", "int8", "pruned", "distilled", "tflite-fp16", "tflite-int8")
# Maximum length of a client file name that upload errors show as sent; longer or unprintable names are
# shown quoted and cut.
MAX_SHOWN_FILENAME_CHARS = 255


def variant_id_for(name: str, version: str, kind: str) -> str:
    return f"{name}:{version}:{kind}"


def check_variant_kind(kind: str, file_format: str | None, source: str) -> None:
    """Raise InvalidArgument unless kind is an upload variant kind, and one for file_format when it is given.

    source names the file in the message; file_format is "onnx" or "tflite", or None before the file is read.
    """
    if not VARIANT_KIND_PATTERN.match(kind):
        raise InvalidArgument("header.variant_kind", f"{kind!r} must be 1-32 characters of a-z, 0-9 and '-'")
    if kind == "source":
        raise InvalidArgument("header.variant_kind", "'source' is reserved for the uploaded version itself")
    kind_format = next((f for f, kinds in UPLOAD_VARIANT_KINDS.items() if kind in kinds), None)
    if kind_format is None:
        allowed = " or ".join(
            f"{', '.join(kinds)} for {FORMAT_NAMES[f]} files" for f, kinds in UPLOAD_VARIANT_KINDS.items()
        )
        raise InvalidArgument("header.variant_kind", f"{kind!r} is not a known variant kind; use {allowed}")
    if file_format is not None and file_format != kind_format:
        shown_format = FORMAT_NAMES.get(file_format, file_format)
        allowed = ", ".join(UPLOAD_VARIANT_KINDS.get(file_format, ())) or "none"
        raise InvalidArgument(
            "header.variant_kind",
            f"{kind!r} is a kind for {FORMAT_NAMES[kind_format]} files, but {source} is {shown_format}; "
            f"the kinds for {shown_format} files are {allowed}",
        )


def upload_source(header: operator_pb2.UploadModelHeader) -> str:
    """Return the name that upload errors give the file: the client's file name, or the model reference."""
    filename = header.filename
    if not filename:
        return f"<upload of {header.name}:{header.version}>"
    if filename.isprintable() and len(filename) <= MAX_SHOWN_FILENAME_CHARS:
        return filename
    return repr(filename[:MAX_SHOWN_FILENAME_CHARS])


def upload_error(error: UploadError) -> EdgefleetError:
    """Map an artifact-store upload error to the catalog's status codes."""
    if isinstance(error, UploadValidationError):
        if isinstance(error.__cause__, EdgefleetError):
            # The validation callback's own catalog checks, such as a version conflict, keep their code.
            return error.__cause__
        # A file that is not a usable model is bad input from the caller.
        return InvalidArgument("file", str(error).removeprefix("uploaded file was rejected: "))
    return EdgefleetError(str(error), code=error.status_code)


async def upload_model(
    requests: AsyncIterator[operator_pb2.UploadModelRequest], state: OrchestratorState
) -> operator_pb2.Model:
    """Receive a client-streamed model file, inspect it and add it to the catalog.

    Without variant_kind the file becomes a new model version with its source variant; with it, the
    file becomes a variant of an existing version. Nothing is stored when any check fails.
    """
    iterator = aiter(requests)
    first = await anext(iterator, None)
    if first is None or first.WhichOneof("body") != "header":
        raise InvalidArgument("header", "the upload stream must start with a header message")
    header = first.header
    validation.check_name(header.name, "header.name")
    validation.check_name(header.version, "header.version")
    kind = header.variant_kind
    source = upload_source(header)
    declared_format = _declared_format(header)
    if kind:
        check_variant_kind(kind, declared_format, source)
        await asyncio.to_thread(_existing_version, header.name, header.version, state)

    def validate(path: Path) -> ModelMetadata:
        try:
            metadata = inspect_model(path, source)
        except ModelFileError as error:
            raise ValueError(str(error)) from None
        if declared_format is not None and declared_format != metadata.format:
            raise ValueError(f"header.format is {declared_format} but {source} is a {metadata.format} model")
        if kind:
            check_variant_kind(kind, metadata.format, source)
        else:
            _check_version_conflict(header.name, header.version, "sha256:" + sha256_file(path), state)
        return metadata

    assembler = UploadAssembler(state.artifacts, max_size_bytes=state.config.max_upload_bytes, validate=validate)
    suffix = temp_suffix(header.filename)
    try:
        upload = assembler.begin(size_bytes=header.size_bytes, sha256=header.sha256, suffix=suffix)
    except UploadError as error:
        state.telemetry.uploads.labels("rejected").inc()
        raise upload_error(error) from None
    with upload:
        try:
            async for request in iterator:
                if request.WhichOneof("body") != "chunk":
                    raise InvalidArgument("body", "the upload stream contains a second header; send it once")
                await asyncio.to_thread(upload.write, request.chunk)
            result = await asyncio.to_thread(upload.commit)
        except UploadError as error:
            state.telemetry.uploads.labels("rejected").inc()
            raise upload_error(error) from None
    state.telemetry.uploads.labels("stored").inc()

    metadata = result.validation
    now = datetime.now(UTC)
    variant_id = variant_id_for(header.name, header.version, kind or "source")
    gated = kind in GATED_UPLOAD_KINDS
    variant = Variant(
        variant_id=variant_id,
        model_name=header.name,
        model_version=header.version,
        kind=kind or "source",
        format=metadata.format,
        precision=metadata.precision,
        digest=result.digest,
        size_bytes=result.size_bytes,
        metadata=metadata,
        status="pending" if gated else "accepted",
        rejection_reason=pending_reason(header.name, header.version, variant_id) if gated else "",
        accuracy_drop=None if kind else 0.0,  # The source loses nothing against itself.
        created_at=now,
    )
    return await asyncio.to_thread(_store_upload, header, variant, state, now)


def pending_reason(name: str, version: str, variant_id: str) -> str:
    """Return the status reason of an uploaded variant that waits for the gate, with the command that gates it."""
    return (
        "not gated yet, so its accuracy is unmeasured and it cannot be deployed; gate it with "
        f"`edgefleet models compress {name}:{version} --gate {variant_id} --evaluation SOURCE`"
    )


def _declared_format(header: operator_pb2.UploadModelHeader) -> str | None:
    """Return the header's format ("onnx" or "tflite"), or None when it is unset; raise InvalidArgument if unknown."""
    if not header.format:
        return None
    try:
        return format_from_proto(header.format)
    except ValueError as error:
        raise InvalidArgument("header.format", str(error)) from None


def _existing_version(name: str, version: str, state: OrchestratorState) -> ModelVersion:
    try:
        return state.store.get_model_version(name, version)
    except NotFoundError:
        known = sorted({f"{m.name}:{m.version}" for m in state.store.list_model_versions()})
        hint = suggest(f"{name}:{version}", known, MODELS_LISTING)
        raise NotFound(f"model {name}:{version} not found{hint}") from None


def _check_version_conflict(name: str, version: str, digest: str, state: OrchestratorState) -> None:
    try:
        existing = state.store.get_model_version(name, version)
    except NotFoundError:
        return
    if existing.digest != digest:
        raise AlreadyExists(
            f"model {name}:{version} already exists with other content ({existing.digest}); "
            "upload it under a new version"
        )


def _store_upload(
    header: operator_pb2.UploadModelHeader, variant: Variant, state: OrchestratorState, now: datetime
) -> operator_pb2.Model:
    try:
        if variant.kind == "source":
            model = ModelVersion(
                name=header.name,
                version=header.version,
                digest=variant.digest,
                size_bytes=variant.size_bytes,
                metadata=variant.metadata,
                created_at=now,
            )
            model = state.store.add_model_version(model, variant)
        else:
            state.store.add_variant(variant)
            model = state.store.get_model_version(header.name, header.version)
    except AlreadyExistsError as error:
        if variant.kind == "source":
            raise AlreadyExists(f"{error}; upload it under a new version") from None
        # Uploaded variant ids are NAME:VERSION:KIND, so a version can have one uploaded variant of each kind.
        raise AlreadyExists(
            f"{error}: a model version can have one uploaded variant of each kind; upload this one as a new "
            f"version, or delete the existing one first (edgefleet models delete {header.name}:{header.version} "
            f"--variant {variant.variant_id})"
        ) from None
    log.info(
        "stored model=%s:%s variant=%s format=%s size=%d macs=%d status=%s",
        header.name,
        header.version,
        variant.variant_id,
        variant.format,
        variant.size_bytes,
        variant.metadata.macs,
        variant.status,
    )
    return serde.model_to_proto(model, state.store.list_variants(model.name, model.version))


def list_models(request: operator_pb2.ListModelsRequest, state: OrchestratorState) -> operator_pb2.ListModelsResponse:
    if request.name:
        validation.check_name(request.name, "name")
    models = state.store.list_model_versions(request.name or None)
    return operator_pb2.ListModelsResponse(
        models=[serde.model_to_proto(m, state.store.list_variants(m.name, m.version)) for m in models]
    )


def get_model(request: operator_pb2.GetModelRequest, state: OrchestratorState) -> operator_pb2.Model:
    validation.check_name(request.name, "name")
    if request.version:
        validation.check_name(request.version, "version")
        model = _existing_version(request.name, request.version, state)
    else:
        try:
            model = state.store.get_model_version(request.name)
        except NotFoundError:
            known = sorted({m.name for m in state.store.list_model_versions()})
            raise NotFound(f"model {request.name!r} not found{suggest(request.name, known, MODELS_LISTING)}") from None
    return serde.model_to_proto(model, state.store.list_variants(model.name, model.version))


def list_variants(
    request: operator_pb2.ListVariantsRequest, state: OrchestratorState
) -> operator_pb2.ListVariantsResponse:
    model = get_model(operator_pb2.GetModelRequest(name=request.model_name, version=request.model_version), state)
    return operator_pb2.ListVariantsResponse(variants=list(model.variants))


def delete_model(
    request: operator_pb2.DeleteModelRequest, state: OrchestratorState
) -> operator_pb2.DeleteModelResponse:
    """Delete one variant of a model version, or the version with all its variants, and unused artifact files.

    Raises InvalidArgument for a malformed name, an empty version or an oversized variant_id; NotFound,
    with the closest known names, for an unknown version or variant; FailedPrecondition, naming what
    blocks the deletion and the fix, when Store.delete_model rejects it. Nothing changes on any error.
    """
    validation.check_name(request.name, "name")
    if not request.version:
        raise InvalidArgument(
            "version",
            f"missing; name the version to delete explicitly ({request.name}:VERSION), "
            f"list them with `edgefleet models list --name {request.name}`",
        )
    validation.check_name(request.version, "version")
    validation.check_text(request.variant_id, "variant_id")
    model = _existing_version(request.name, request.version, state)
    if request.variant_id:
        known = [v.variant_id for v in state.store.list_variants(model.name, model.version)]
        if request.variant_id not in known:
            raise NotFound(
                f"variant {request.variant_id!r} of {model.name}:{model.version} not found"
                f"{suggest(request.variant_id, known)}"
            )

    try:
        deleted = state.store.delete_model(model.name, model.version, request.variant_id)
    except DeleteBlockedError as error:
        raise FailedPrecondition(str(error)) from None
    except NotFoundError as error:
        # Another request deleted it after the checks above.
        raise NotFound(f"{error}; it was deleted meanwhile") from None
    log.warning(
        "deleted %s model=%s:%s variants=%s",
        "variant" if request.variant_id else "version",
        model.name,
        model.version,
        ",".join(deleted.variant_ids),
    )

    # NOTE: a concurrent upload of the same content can store its file before the deletion commits and
    # its row after the file is removed below. That row then has no file, but the window is short.
    removed: list[str] = []
    for digest in deleted.unreferenced_digests:
        try:
            if state.artifacts.delete(digest):
                removed.append(digest)
        except OSError as error:
            log.error("removing the unreferenced artifact %s failed; remove the file by hand: %s", digest, error)
    if removed:
        log.warning("removed artifacts %s of model=%s:%s", ",".join(removed), model.name, model.version)
    return operator_pb2.DeleteModelResponse(deleted_variant_ids=deleted.variant_ids, removed_digests=removed)


def open_download(
    request: agent_pb2.DownloadArtifactRequest, state: OrchestratorState
) -> Iterator[agent_pb2.ArtifactChunk]:
    """Check that the digest is in the device's desired state and return its chunks from the offset."""
    validation.check_device_id(request.device_id)
    try:
        _, assignments = state.store.get_desired_state(request.device_id)
    except NotFoundError:
        # A device removed through another orchestrator process passes the cached security check.
        reject_if_removed(request.device_id, state)
        raise NotFound(f"device {request.device_id!r} is not registered") from None
    if request.digest not in {a.digest for a in assignments}:
        raise FailedPrecondition(
            f"artifact {request.digest!r} is not in the desired state of device {request.device_id}; "
            "a device downloads only the models assigned to it"
        )
    try:
        return iter_chunks(state.artifacts, request.digest, request.offset, request.chunk_size)
    except DownloadError as error:
        raise EdgefleetError(str(error), code=error.status_code) from None
