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
from edgefleet.orchestrator.handlers.devices import suggest
from edgefleet.orchestrator.modelinfo import ModelFileError, inspect_model
from edgefleet.orchestrator.state import OrchestratorState
from edgefleet.orchestrator.store.base import AlreadyExistsError, NotFoundError
from edgefleet.v1 import agent_pb2, operator_pb2

log = logging.getLogger(__name__)

VARIANT_KIND_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


def variant_id_for(name: str, version: str, kind: str) -> str:
    return f"{name}:{version}:{kind}"


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
    if kind and not VARIANT_KIND_PATTERN.match(kind):
        raise InvalidArgument("header.variant_kind", f"{kind!r} must be 1-32 characters of a-z, 0-9 and '-'")
    if kind == "source":
        raise InvalidArgument("header.variant_kind", "'source' is reserved for the uploaded version itself")
    if kind:
        await asyncio.to_thread(_existing_version, header.name, header.version, state)

    def validate(path: Path) -> ModelMetadata:
        try:
            metadata = inspect_model(path)
        except ModelFileError as error:
            raise ValueError(str(error)) from None
        if header.format and format_from_proto(header.format) != metadata.format:
            raise ValueError(
                f"header.format is {format_from_proto(header.format)} but the file is a {metadata.format} model"
            )
        if not kind:
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
    variant = Variant(
        variant_id=variant_id_for(header.name, header.version, kind or "source"),
        model_name=header.name,
        model_version=header.version,
        kind=kind or "source",
        format=metadata.format,
        precision=metadata.precision,
        digest=result.digest,
        size_bytes=result.size_bytes,
        metadata=metadata,
        created_at=now,
    )
    return await asyncio.to_thread(_store_upload, header, variant, state, now)


def _existing_version(name: str, version: str, state: OrchestratorState) -> ModelVersion:
    try:
        return state.store.get_model_version(name, version)
    except NotFoundError:
        known = sorted({f"{m.name}:{m.version}" for m in state.store.list_model_versions()})
        raise NotFound(f"model {name}:{version} not found{suggest(f'{name}:{version}', known)}") from None


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
        raise AlreadyExists(f"{error}; upload it under a new version or another variant kind") from None
    log.info(
        "stored model=%s:%s variant=%s format=%s size=%d macs=%d",
        header.name,
        header.version,
        variant.variant_id,
        variant.format,
        variant.size_bytes,
        variant.metadata.macs,
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
            raise NotFound(f"model {request.name!r} not found{suggest(request.name, known)}") from None
    return serde.model_to_proto(model, state.store.list_variants(model.name, model.version))


def list_variants(
    request: operator_pb2.ListVariantsRequest, state: OrchestratorState
) -> operator_pb2.ListVariantsResponse:
    model = get_model(operator_pb2.GetModelRequest(name=request.model_name, version=request.model_version), state)
    return operator_pb2.ListVariantsResponse(variants=list(model.variants))


def open_download(
    request: agent_pb2.DownloadArtifactRequest, state: OrchestratorState
) -> Iterator[agent_pb2.ArtifactChunk]:
    """Check that the digest is in the device's desired state and return its chunks from the offset."""
    validation.check_device_id(request.device_id)
    try:
        _, assignments = state.store.get_desired_state(request.device_id)
    except NotFoundError:
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
