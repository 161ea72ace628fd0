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

__all__ = ["read_header", "read_tensors", "SafetensorsFile"]

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


def read_tensors(path: str | Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the file (or only `names`); ValueError on a header or size that does not add up
    (corrupt, truncated) or a name the file lacks."""
    with SafetensorsFile(path) as f:
        return f.read(names)


class SafetensorsFile:
    """An open safetensors file whose header is parsed once; tensors are read on request. Holding the file
    open (not its path) keeps reads working if the file is replaced or deleted meanwhile."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.size = self.path.stat().st_size
        self.file = open(self.path, "rb")
        try:
            self.header, self.base = _header(self.file, self.size)
        except Exception:
            self.file.close()
            raise

    def read(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        if names is None:
            names = list(self.header)
        absent = [n for n in names if n not in self.header]
        if absent:
            raise ValueError(f"{self.path.name} has no tensors {absent[:3]}")
        order = sorted(names, key=lambda n: self.header[n]["data_offsets"][0])  # one forward sweep of the file
        return {n: _read_one(self.file, n, self.header[n], self.base, self.size) for n in order}

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_one(f, name: str, info: dict, base: int, size: int) -> torch.Tensor:
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
    return t
