"""The safetensors format, written as a stream and read without a copy.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length N, N
bytes of JSON ({name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {str: str}},
padded with spaces to a multiple of 8), then the tensors' bytes back to back. The library's own
writer needs the whole file in memory; this one writes the header and then each tensor's memory
straight into any writer (an S3 multipart upload), so a checkpoint never exists as one big copy.
Tensors are laid out largest element size first, as the library does, so every tensor stays aligned.

Training state that is not a flat dict of tensors (an optimizer's state_dict, RNG states) is stored
the same way: `write_state` puts its tensors in the file by path and its structure (dicts with int
or str keys, lists, tuples, plain JSON values) in the metadata, so no checkpoint object is a pickle.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

DTYPES = {
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
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
}
DTYPE_OF = {name: dtype for dtype, name in DTYPES.items()}


def safetensors_header(
    tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> tuple[bytes, list[tuple[str, int, int]]]:
    """The file's first bytes (header length and JSON header) and where each tensor's bytes go:
    (name, begin, end) offsets in the file, largest element size first."""
    order = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    spans = []
    for name in order:
        tensor = tensors[name]
        if tensor.dtype not in DTYPES:
            raise ValueError(f"tensor '{name}' has dtype {tensor.dtype}, which safetensors cannot store")
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        spans.append((name, offset, offset + size))
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    prefix = len(encoded).to_bytes(8, "little") + encoded
    return prefix, [(name, len(prefix) + begin, len(prefix) + end) for name, begin, end in spans]


def write_safetensors(tensors: Mapping[str, torch.Tensor], out: Any, metadata: dict[str, str] | None = None) -> int:
    """Write `tensors` (contiguous CPU tensors) to `out` (anything with write); returns the byte count."""
    prefix, spans = safetensors_header(tensors, metadata)
    out.write(prefix)
    for name, begin, end in spans:
        if end > begin:
            # [numel * element_size] uint8 view of the tensor's own memory: no copy
            out.write(tensors[name].detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return spans[-1][2] if spans else len(prefix)


def read_safetensors(buffer: bytearray) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file held in `buffer`, as views of it (no copy)."""
    return _parse(buffer)[0]


def _parse(buffer: bytearray) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        length = int.from_bytes(buffer[:8], "little")
        header = json.loads(bytes(buffer[8 : 8 + length]))
        metadata = header.pop("__metadata__", None) or {}
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
        return tensors, metadata
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        raise ValueError(f"not a valid safetensors file ({type(error).__name__}: {error})") from None


STATE_KEY = "dvgt_state"  # the metadata entry that holds a state tree's structure


def state_tensors(tree: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A state tree as what its safetensors file holds: its tensors by path, and its structure as metadata."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(tree, "", tensors)
    return tensors, {STATE_KEY: json.dumps(structure)}


def write_state(tree: Any, out: Any) -> int:
    """Write a state tree (nested dicts, lists and tuples of CPU tensors and JSON values) to `out`."""
    tensors, metadata = state_tensors(tree)
    return write_safetensors(tensors, out, metadata=metadata)


def read_state(buffer: bytearray) -> Any:
    """The state tree of a `write_state` file; its tensors are views of `buffer` (no copy)."""
    tensors, metadata = _parse(buffer)
    if STATE_KEY not in metadata:
        raise ValueError("not a state file (its metadata has no structure)")
    try:
        return _decode(json.loads(metadata[STATE_KEY]), tensors)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"the state file's structure is invalid ({type(error).__name__}: {error})") from None


# A tensor is {"tensor": path}; a dict is {"dict": [[key, value], ...]} (keys keep their type: an
# optimizer's state is keyed by parameter index); a tuple is {"tuple": [...]}; a list stays a list.
def _encode(tree: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if torch.is_tensor(tree):
        if path in tensors:
            raise ValueError(f"two state entries are both named '{path}'; rename one (a key with a '.' in it?)")
        tensors[path] = tree.detach().contiguous()
        return {"tensor": path}
    if isinstance(tree, dict):
        for key in tree:
            if not isinstance(key, (str, int)) or isinstance(key, bool):
                raise TypeError(
                    f"state key {key!r} at '{path}' is a {type(key).__name__}; only str and int keys are stored"
                )
        return {
            "dict": [
                [key, _encode(value, f"{path}.{key}" if path else str(key), tensors)] for key, value in tree.items()
            ]
        }
    if isinstance(tree, (list, tuple)):
        items = [_encode(value, f"{path}.{i}" if path else str(i), tensors) for i, value in enumerate(tree)]
        return {"tuple": items} if isinstance(tree, tuple) else items
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise TypeError(
        f"state value at '{path}' is a {type(tree).__name__}, which a checkpoint cannot store "
        f"(tensors, dicts, lists, tuples, numbers, strings, None)"
    )


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(value, tensors) for value in node]
    if isinstance(node, dict):
        ((kind, value),) = node.items()
        if kind == "tensor":
            return tensors[value]
        if kind == "dict":
            return {key: _decode(item, tensors) for key, item in value}
        if kind == "tuple":
            return tuple(_decode(item, tensors) for item in value)
        raise ValueError(f"unknown node '{kind}'")
    return node
