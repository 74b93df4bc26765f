"""Check whether the runtime version that a device reports can load a variant.

onnxruntime loads a model whose default-domain opset is at most the opset its release implements.
LiteRT loads a TFLite model when it is at least the model's min_runtime_version, which the TFLite
converter writes into the flatbuffer's metadata.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass

from edgefleet.common.hardware import HardwareProfile, RuntimeInfo
from edgefleet.orchestrator.costmodel.features import FORMAT_RUNTIMES
from edgefleet.orchestrator.domain import Variant

log = logging.getLogger(__name__)

Release = tuple[int, int, int]

# The newest default-domain ONNX opset that each onnxruntime release implements, by (major, minor),
# from the version matrix on https://onnxruntime.ai/docs/reference/compatibility.html. Patch
# releases implement the opset of their minor release. Every release also loads opsets down to 7.
# NOTE: rows 1.11 to 1.15 and from 1.18 on are not verified against the published matrix. The older
# docs/Versioning.md in the onnxruntime repository stops at 1.12 and lists 1.11 and 1.12 at opset 15.
# A wrong row excludes a variant that would load, or lets through one that fails at load.
ONNXRUNTIME_MAX_OPSET: dict[tuple[int, int], int] = {
    (0, 1): 8,
    (0, 2): 8,
    (0, 3): 9,
    (0, 4): 10,
    (0, 5): 10,
    (1, 0): 11,
    (1, 1): 11,
    (1, 2): 11,
    (1, 3): 12,
    (1, 4): 12,
    (1, 5): 12,
    (1, 6): 13,
    (1, 7): 13,
    (1, 8): 14,
    (1, 9): 15,
    (1, 10): 15,
    (1, 11): 16,
    (1, 12): 17,
    (1, 13): 17,
    (1, 14): 18,
    (1, 15): 19,
    (1, 16): 19,
    (1, 17): 20,
    (1, 18): 21,
    (1, 19): 21,
    (1, 20): 21,
    (1, 21): 22,
    (1, 22): 22,
    (1, 23): 23,
}

# Major, minor and optional patch at the start of a version string: "1.17", "1.17.3",
# "1.18.0rc1", "1.18.0.dev20240101" and "1.17.3+cu118" all match.
_RELEASE = re.compile(r"v?(\d+)\.(\d+)(?:\.(\d+))?")

# TFLite converters write min_runtime_version as a TensorFlow release. tflite-runtime shares those
# numbers, but ai-edge-litert numbers its own releases from 1.0. It took over from TensorFlow Lite
# 2.17, the last release on Maven, which moved to LiteRT 1.0.1. So every ai-edge-litert release
# loads what TensorFlow Lite 2.17 loads, and its version does not show whether it meets a newer
# requirement.
LITERT_SUCCEEDS_TENSORFLOW: Release = (2, 17, 0)

# Reason for an exclusion, as the first words of Candidate.reason.
RUNTIME_TOO_OLD = "runtime version too old"


@dataclass(frozen=True)
class RuntimeCheck:
    """Whether a device's runtime can load a variant, and the text an operator reads about it."""

    loads: bool
    reason: str = ""  # The exclusion reason, or a note when the version could not be checked. "" otherwise.


def parse_release(version: str) -> Release | None:
    """Return (major, minor, patch) from the start of a runtime version string, or None when it does not parse.

    A missing patch number counts as 0. Pre-release and local suffixes are ignored, so
    "1.18.0rc1" parses as (1, 18, 0).
    """
    match = _RELEASE.match(version.strip())
    if match is None:
        return None
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


@functools.cache
def _installed_onnxruntime_row() -> tuple[tuple[int, int], int] | None:
    """Return the installed onnxruntime's (major, minor) and the newest opset it loads, or None without it."""
    try:
        import onnxruntime

        from edgefleet.orchestrator.modelinfo_onnx import supported_opset_range
    except ImportError:
        return None
    release = parse_release(str(onnxruntime.__version__))
    if release is None:
        return None
    return (release[0], release[1]), supported_opset_range()[1]


def known_onnxruntime_opsets() -> dict[tuple[int, int], int]:
    """Return ONNXRUNTIME_MAX_OPSET with the orchestrator's own onnxruntime release added.

    The orchestrator's release is measured from the operator schemas it registers, so a device
    that runs the same release loads every opset that the orchestrator accepted at upload.
    """
    known = dict(ONNXRUNTIME_MAX_OPSET)
    installed = _installed_onnxruntime_row()
    if installed is not None:
        release, opset = installed
        known[release] = max(known.get(release, 0), opset)
    return known


def onnxruntime_max_opset(version: str) -> int | None:
    """Return the newest default-domain opset that an onnxruntime release loads, or None when version does not parse.

    A release newer than every known one loads the newest known opset. A release older than
    every known one loads opset 8, the opset of the oldest release.
    """
    release = parse_release(version)
    if release is None:
        return None
    known = known_onnxruntime_opsets()
    older_or_equal = [opset for key, opset in known.items() if key <= release[:2]]
    if not older_or_equal:
        return min(known.values())
    return max(older_or_equal)


def first_onnxruntime_for_opset(opset: int) -> str:
    """Return the oldest known onnxruntime release ("1.17") that loads opset, or "" when none is known to."""
    releases = [key for key, newest in known_onnxruntime_opsets().items() if newest >= opset]
    if not releases:
        return ""
    major, minor = min(releases)
    return f"{major}.{minor}"


def device_runtime(hardware: HardwareProfile, variant_format: str) -> RuntimeInfo | None:
    """Return the device's runtime that executes variant_format, or None when it has none."""
    name = FORMAT_RUNTIMES.get(variant_format)
    return next((runtime for runtime in hardware.runtimes if runtime.name == name), None)


def check_runtime_version(hardware: HardwareProfile, variant: Variant) -> RuntimeCheck:
    """Check that the device's runtime version loads the variant.

    A runtime version that does not parse counts as unknown. The variant is then allowed, and the
    returned reason notes that the version was not checked. A device without the variant's runtime
    is allowed here, because the format check reports it.
    """
    runtime = device_runtime(hardware, variant.format)
    if runtime is None:
        return RuntimeCheck(loads=True)
    if variant.format == "onnx":
        return _check_onnxruntime(runtime, variant)
    if variant.format == "tflite":
        return _check_litert(runtime, variant)
    return RuntimeCheck(loads=True)


def _unknown_version(runtime: RuntimeInfo, requirement: str) -> RuntimeCheck:
    version_text = repr(runtime.version) if runtime.version else "an empty version"
    return RuntimeCheck(
        loads=True,
        reason=f"{runtime.name} version {version_text} on the device does not parse, so {requirement} was not checked; "
        "fix the version the device reports",
    )


def _check_onnxruntime(runtime: RuntimeInfo, variant: Variant) -> RuntimeCheck:
    opset = variant.metadata.opset
    if opset <= 0:
        return RuntimeCheck(loads=True)
    newest = onnxruntime_max_opset(runtime.version)
    if newest is None:
        return _unknown_version(runtime, f"opset {opset}")
    if opset <= newest:
        return RuntimeCheck(loads=True)
    first = first_onnxruntime_for_opset(opset)
    upgrade = f"upgrade onnxruntime on the device to {first} or later" if first else "upgrade onnxruntime on the device"
    return RuntimeCheck(
        loads=False,
        reason=f"{RUNTIME_TOO_OLD}: onnxruntime {runtime.version} on the device loads ONNX opset {newest} at most, "
        f"but the variant uses opset {opset}; {upgrade}, or add a variant at opset {newest} or lower",
    )


def _check_litert(runtime: RuntimeInfo, variant: Variant) -> RuntimeCheck:
    required_text = variant.metadata.min_runtime_version
    if not required_text:
        # NOTE: a variant stored before min_runtime_version was read at upload also has "" here when
        # the start-up backfill could not read its artifact, so its requirement goes unchecked.
        return RuntimeCheck(loads=True)
    required = parse_release(required_text)
    if required is None:
        return RuntimeCheck(
            loads=True,
            reason=f"the variant's min_runtime_version {required_text!r} does not parse, so it was not checked",
        )
    installed = parse_release(runtime.version)
    if installed is None:
        return _unknown_version(runtime, f"min_runtime_version {required_text}")
    if installed >= required:
        return RuntimeCheck(loads=True)
    if runtime.package != "tflite-runtime":
        return _check_renumbered_litert(runtime, required, required_text)
    return RuntimeCheck(
        loads=False,
        reason=f"{RUNTIME_TOO_OLD}: tflite-runtime {runtime.version} on the device is older than {required_text}, "
        "the variant's min_runtime_version; replace tflite-runtime on the device with ai-edge-litert, or add a "
        "variant converted for an older runtime",
    )


def _check_renumbered_litert(runtime: RuntimeInfo, required: Release, required_text: str) -> RuntimeCheck:
    """Check a LiteRT that is not tflite-runtime, whose version is below the TensorFlow release required.

    ai-edge-litert loads every requirement up to LITERT_SUCCEEDS_TENSORFLOW. A newer one, or a
    device that does not report which package it runs (agents older than the package field), is allowed
    with a note, because the device's version cannot be compared with a TensorFlow release.
    """
    if runtime.package == "ai-edge-litert" and required <= LITERT_SUCCEEDS_TENSORFLOW:
        return RuntimeCheck(loads=True)
    if runtime.package:
        numbering = (
            f"{runtime.package} {runtime.version} on the device numbers its releases differently from TensorFlow"
        )
    else:
        numbering = (
            f"the device does not name its LiteRT package, so its version {runtime.version} "
            "may not be a TensorFlow release"
        )
    return RuntimeCheck(loads=True, reason=f"min_runtime_version {required_text} was not checked: {numbering}")
