"""Tiny, explicit encodings for what goes inside a Channel message."""

from __future__ import annotations

import struct

import numpy as np

from .transport import ProtocolError


def pack_blobs(blobs: list[bytes]) -> bytes:
    """A list of byte strings (e.g. serialized ciphertexts) as one payload."""
    parts = [struct.pack("<I", len(blobs))]
    for blob in blobs:
        parts.append(struct.pack("<Q", len(blob)))
        parts.append(blob)
    return b"".join(parts)


def unpack_blobs(payload: bytes, what: str = "ciphertext list") -> list[bytes]:
    try:
        (count,) = struct.unpack_from("<I", payload, 0)
        offset = 4
        blobs = []
        for _ in range(count):
            (length,) = struct.unpack_from("<Q", payload, offset)
            offset += 8
            if offset + length > len(payload):
                raise ProtocolError(f"truncated {what}: item needs {length} bytes, {len(payload) - offset} left")
            blobs.append(payload[offset : offset + length])
            offset += length
    except struct.error as exc:
        raise ProtocolError(f"truncated or corrupted {what}") from exc
    if offset != len(payload):
        raise ProtocolError(f"{len(payload) - offset} trailing bytes after {what}")
    return blobs


def pack_array(array: np.ndarray) -> bytes:
    """A 1-D int64/uint64 array as raw little-endian bytes with a dtype tag."""
    array = np.ascontiguousarray(array)
    tag = {np.dtype(np.int64): b"i", np.dtype(np.uint64): b"u"}[array.dtype]
    return tag + array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def unpack_array(payload: bytes, expected_len: int | None = None, what: str = "array") -> np.ndarray:
    if not payload or payload[:1] not in (b"i", b"u") or (len(payload) - 1) % 8:
        raise ProtocolError(f"corrupted {what}: {len(payload)} bytes")
    dtype = np.dtype("<i8") if payload[:1] == b"i" else np.dtype("<u8")
    array = np.frombuffer(payload, dtype=dtype, offset=1).astype(dtype.newbyteorder("="))
    if expected_len is not None and array.size != expected_len:
        raise ProtocolError(f"{what} has {array.size} elements, expected {expected_len}")
    return array
