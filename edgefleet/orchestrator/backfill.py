"""Fill in variant metadata that earlier orchestrator releases did not store, from the stored artifacts."""

from __future__ import annotations

import hashlib
import logging

from edgefleet.orchestrator.artifacts import ArtifactNotFoundError, ArtifactStore, parse_digest
from edgefleet.orchestrator.modelinfo_tflite import MetadataReadError, read_min_runtime_version
from edgefleet.orchestrator.store.base import Store

log = logging.getLogger(__name__)


def fill_min_runtime_versions(store: Store, artifacts: ArtifactStore) -> int:
    """Read min_runtime_version from the artifact of each TFLite variant stored without it, and store it.

    A variant whose artifact is missing, cannot be read or does not match its digest keeps no entry,
    with one warning naming it, so selection does not check its requirement and the next start tries
    again. Returns the number of variants filled in. Runs at start-up, before the orchestrator serves.
    """
    filled = 0
    for variant in store.list_tflite_variants_without_min_runtime_version():
        source = f"variant {variant.variant_id} ({variant.digest})"
        try:
            with artifacts.open(variant.digest) as file:
                content = file.read()
        except ArtifactNotFoundError:
            log.warning(
                "cannot read min_runtime_version of %s: its artifact is missing from the artifact store, so "
                "selection does not check the LiteRT version it needs; upload the file again as a new version",
                source,
            )
            continue
        except (OSError, ValueError) as error:
            log.warning("cannot read min_runtime_version of %s: cannot read its artifact: %s", source, error)
            continue

        if hashlib.sha256(content).hexdigest() != parse_digest(variant.digest):
            log.warning(
                "cannot read min_runtime_version of %s: its artifact does not match the digest, so it is "
                "corrupt; upload the file again as a new version",
                source,
            )
            continue
        try:
            version = read_min_runtime_version(content, source)
        except MetadataReadError as error:
            log.warning("cannot read min_runtime_version of %s: %s", source, error)
            continue

        store.set_min_runtime_version(variant.variant_id, version)
        log.info("stored min_runtime_version %r of %s, read from its artifact", version, source)
        filled += 1
    return filled
