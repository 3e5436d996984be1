"""safetensors files written and read without extra copies of the tensors.

safetensors' own ``save`` builds the whole file in memory (and ``save_file`` first makes a
bytes copy of every tensor); ``load`` of a bytes payload holds the payload and the tensors.
At N = 10M with a few targets those copies are gigabytes. Here the file is the standard
format (a little-endian u64 header length, a JSON header of name -> dtype, shape and byte
offsets, padded to 8 bytes, then the raw bytes), produced as a list of buffers that point
into the tensors' own memory, and read back through ``safe_open``, one tensor at a time.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

# safetensors' dtype names.
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_CHUNK_BYTES = 1 << 24


def safetensors_parts(tensors: Mapping[str, Tensor]) -> list[memoryview]:
    """The bytes of a safetensors file holding ``tensors``, as buffers over the tensors' own memory.

    Contiguous CPU tensors are not copied (on little-endian machines); others are copied one
    at a time to the CPU. Write the parts in order to get the file.

    Example::

        >>> import io, torch
        >>> from safetensors.torch import load
        >>> stream = io.BytesIO()
        >>> for part in safetensors_parts({"a": torch.arange(3.0)}):
        ...     _ = stream.write(part)
        >>> load(stream.getvalue())["a"].tolist()
        [0.0, 1.0, 2.0]
    """
    header: dict[str, object] = {}
    offset = 0
    parts: list[memoryview] = []
    for name, tensor in tensors.items():
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(
                f"safetensors_parts: tensor {name!r} has dtype {tensor.dtype}; supported: "
                f"{sorted(str(d) for d in SAFETENSORS_DTYPES)}. Convert it first."
            )
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
        # numpy has no bfloat16 (and torch.bool views as uint8 bytes): hand over the raw bytes.
        raw = tensor.reshape(-1).view(torch.uint8) if tensor.numel() else torch.zeros(0, dtype=torch.uint8)
        array = raw.numpy()
        if sys.byteorder != "little" and tensor.element_size() > 1:
            array = tensor.reshape(-1).numpy().byteswap().view("uint8")
        parts.append(memoryview(array).cast("B"))
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # safetensors aligns the data to 8 bytes
    return [memoryview(len(encoded).to_bytes(8, "little") + encoded), *parts]


def sha256_of(parts: Iterable[memoryview | bytes]) -> str:
    """SHA-256 of the concatenated parts (no concatenation is made)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file read in 16 MiB chunks (never the whole file in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def read_tensors(path: Path, keys: Iterable[str]) -> tuple[dict[str, Tensor], set[str]]:
    """``({key: tensor}, all keys in the file)`` for the ``keys`` present; nothing else is read.

    ``safe_open`` maps the file: memory holds the tensors asked for, never the file's bytes as well.
    """
    out: dict[str, Tensor] = {}
    with safe_open(str(path), framework="pt") as handle:
        available = set(handle.keys())
        for key in keys:
            if key in available:
                out[key] = handle.get_tensor(key)
    return out, available
