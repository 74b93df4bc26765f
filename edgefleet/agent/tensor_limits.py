"""Shape limits of the input tensors that the local gRPC API and the tensor socket accept."""

from __future__ import annotations

import math
from collections.abc import Sequence

# Largest dimension of a tensor, and largest element count: 64 Mi, as many as bytes fit in the
# 64 MiB message limit of both sockets. Within these limits the byte count of a shape always fits in
# int64, which numpy computes sizes in, so a huge shape cannot wrap around to match a short buffer.
MAX_DIMENSION = 64 * 1024 * 1024
MAX_ELEMENTS = 64 * 1024 * 1024
# Most axes of a tensor: far more than any model input has, and below numpy 2's limit of 64, which
# numpy reports without the input's name.
MAX_AXES = 32


def check_shape(name: str, shape: Sequence[int]) -> tuple[int, ...]:
    """Return shape as a tuple; raise ValueError naming the tensor and the limit when it is out of range.

    The shape may have at most MAX_AXES axes, each from 0 to MAX_DIMENSION, and the dimensions must
    multiply to at most MAX_ELEMENTS. The product is taken with Python integers, which do not overflow.
    """
    if len(shape) > MAX_AXES:
        raise ValueError(f"input {name!r} has {len(shape)} axes; a tensor may have at most {MAX_AXES}")
    dims = tuple(int(d) for d in shape)
    if any(d < 0 or d > MAX_DIMENSION for d in dims):
        raise ValueError(f"input {name!r} has shape {list(dims)}; each dimension must be from 0 to {MAX_DIMENSION}")
    elements = math.prod(dims)
    if elements > MAX_ELEMENTS:
        raise ValueError(
            f"input {name!r} has shape {list(dims)} of {elements} elements, over the limit of {MAX_ELEMENTS} "
            "(the 64 MiB message limit at 1 byte per element); send fewer rows per call"
        )
    return dims
