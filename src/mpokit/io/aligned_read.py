"""Read a safetensors file into fresh, aligned tensors, one at a time, without mapping the file.

safetensors' own loaders map the file and hand out unaligned views (CPU matmul kernels round
differently on unaligned data, so they were copied): the mapped pages plus the copies held the
model twice at the peak. Reading each tensor straight into its own allocation keeps the peak at
the model plus nothing. The format is a little-endian u64 header length, a JSON header of
{name: {dtype, shape, data_offsets}}, then the data (https://github.com/huggingface/safetensors).
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

__all__ = ["read_header", "read_tensors"]

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _header(f, size: int) -> tuple[dict, int]:
    raw = f.read(8)
    if len(raw) < 8:
        raise ValueError("file shorter than its header length")
    (n,) = struct.unpack("<Q", raw)
    if n > size - 8:
        raise ValueError(f"header of {n} bytes in a file of {size}")
    header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def read_header(path: str | Path) -> dict[str, dict]:
    """{name: {dtype, shape, data_offsets}} of a safetensors file, without reading its tensors."""
    path = Path(path)
    with open(path, "rb") as f:
        return _header(f, path.stat().st_size)[0]


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the file; ValueError on a header or size that does not add up (corrupt, truncated)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        header, base = _header(f, size)
        out = {}
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            dtype = _DTYPES.get(info.get("dtype"))
            start, end = info["data_offsets"]
            if dtype is None:
                raise ValueError(f"tensor {name!r}: unknown dtype {info.get('dtype')!r}")
            numel = math.prod(info["shape"])
            if end - start != numel * torch.empty((), dtype=dtype).element_size() or base + end > size:
                raise ValueError(f"tensor {name!r}: its bytes [{start}, {end}) do not fit its shape or the file")
            t = torch.empty(info["shape"], dtype=dtype)
            f.seek(base + start)
            if numel and f.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != end - start:
                raise ValueError(f"tensor {name!r}: the file ends inside it")
            out[name] = t
    return out
