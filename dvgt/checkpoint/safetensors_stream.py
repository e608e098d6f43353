"""The safetensors format, written as a stream and read without a copy.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length N, N
bytes of JSON ({name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}},
padded with spaces to a multiple of 8), then the tensors' bytes back to back. The library's own
writer needs the whole file in memory; this one writes the header and then each tensor's memory
straight into any writer (an S3 multipart upload), so a checkpoint never exists as one big copy.
Tensors are laid out largest element size first, as the library does, so every tensor stays aligned.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Mapping, Optional

import torch

DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
}
DTYPE_OF = {name: dtype for dtype, name in DTYPES.items()}


def write_safetensors(tensors: Mapping[str, torch.Tensor], out: Any, metadata: Optional[Dict[str, str]] = None) -> int:
    """Write `tensors` (contiguous CPU tensors) to `out` (anything with write); returns the byte count."""
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: Dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        tensor = tensors[name]
        if tensor.dtype not in DTYPES:
            raise ValueError(f"tensor '{name}' has dtype {tensor.dtype}, which safetensors cannot store")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    out.write(len(encoded).to_bytes(8, "little"))
    out.write(encoded)
    for name in order:
        tensor = tensors[name]
        if tensor.numel():
            # [numel * element_size] uint8 view of the tensor's own memory: no copy
            out.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return 8 + len(encoded) + offset


def read_safetensors(buffer: bytearray) -> Dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in `buffer`, as views of it (no copy)."""
    try:
        length = int.from_bytes(buffer[:8], "little")
        header = json.loads(bytes(buffer[8:8 + length]))
        header.pop("__metadata__", None)
        base = 8 + length
        tensors = {}
        for name, info in header.items():
            begin, end = info["data_offsets"]
            dtype, shape = DTYPE_OF[info["dtype"]], info["shape"]
            if base + end > len(buffer) or begin > end:
                raise ValueError(f"tensor '{name}' lies outside the file")
            if begin == end:
                tensors[name] = torch.empty(shape, dtype=dtype)
                continue
            raw = torch.frombuffer(buffer, dtype=torch.uint8, count=end - begin, offset=base + begin)
            tensors[name] = raw.view(dtype).reshape(shape)
        return tensors
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        raise ValueError(f"not a valid safetensors file ({type(error).__name__}: {error})") from None
