"""A data set stored as one matrix product state per sample: compress, decompress, save, load.

Each sample (an image, a vector) is laid out on small sites (ops.mps.image_layout: 8x8 digits
-> six sites of dimension 2, row and column digits interleaved) and decomposed by TT-SVD into
cores (r_{k-1}, d_k, r_k), truncated to one of three targets:
- bytes_per_sample: every sample stores at most that many bytes (cores + its bond table row);
- total_bytes: the whole set stores at most that many; ops.budget.plan spends them where they
  remove the most squared error (a blank-ish digit gets small bonds, a busy one larger);
- max_error: every sample's relative Frobenius error ||x - x'|| / ||x||, measured after the
  cores are cast to the storage dtype, is at most that.

What is counted (`nbytes`): the core values (float16: 2 bytes each, float32: 4, float64: 8) plus
the bond table, one uint8 per bond per sample (uint16 when a full bond exceeds 255). The layout,
the sample shape and the labels are not image bytes: labels are stored beside the cores and
counted apart (`label_bytes`); the file adds a JSON header (`file_bytes` is the real size).

File: one .safetensors file with tensors `cores` (all cores flattened, sample-major), `bonds`
(N, n-1), optionally `labels` (N,) and the measured `errors` (N,) (a diagnostic, not needed to
decompress, not counted), and the JSON description in its metadata. mpokit.data must not import
mpokit.io, so the file is written here the same way io.atomic does: a temporary file beside the
target, fsynced, then os.replace; an existing file is replaced only with overwrite=True.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mpokit.ops.budget import plan
from mpokit.ops.mps import (LAYOUTS, MPSLayout, image_layout, mps_bonds_for_budget, mps_contract_batch,
                            mps_full_bonds, mps_ladder, mps_params, mps_svd, mps_truncate)

__all__ = ["CompressedSet", "MPSDataset", "compress_dataset", "read_array", "write_bytes_atomic", "STORAGE_DTYPES",
           "FORMAT"]

FORMAT = "mpokit-mps-dataset"
VERSION = 1
STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32, "float64": torch.float64}
_CHUNK = 4096  # samples contracted per bmm batch


def _bond_dtype(layout: MPSLayout) -> torch.dtype:
    return torch.uint8 if max(mps_full_bonds(layout.sites), default=1) <= 255 else torch.int16


@dataclass
class CompressedSet:
    """N samples as MPS cores: `cores` (all of them, flat, in the storage dtype) and `bonds` (N, n-1)."""

    layout: MPSLayout
    dtype: str
    cores: torch.Tensor
    bonds: torch.Tensor
    labels: torch.Tensor | None = None
    errors: torch.Tensor | None = None  # (N,) relative error of each stored sample, measured at compression
    meta: dict = field(default_factory=dict)  # how it was made (source, target), kept in the file

    def __post_init__(self):
        n_bonds = len(self.layout.sites) - 1
        if self.bonds.dim() != 2 or self.bonds.shape[1] != n_bonds:
            raise ValueError(f"expected bonds of shape (N, {n_bonds}), got {tuple(self.bonds.shape)}")
        sizes = [mps_params(self.layout.sites, b) for b in self.bonds.tolist()]
        self._offsets = [0, *torch.tensor(sizes, dtype=torch.long).cumsum(0).tolist()]
        if self.cores.dim() != 1 or self.cores.numel() != self._offsets[-1]:
            raise ValueError(f"expected {self._offsets[-1]} core values for these bonds, got {self.cores.numel()}")
        if self.labels is not None and len(self.labels) != len(self):
            raise ValueError(f"expected one label per sample ({len(self)}), got {len(self.labels)}")

    def __len__(self) -> int:
        return self.bonds.shape[0]

    # ---- bytes ----------------------------------------------------------------------------
    @property
    def bond_bytes_per_sample(self) -> int:
        return (len(self.layout.sites) - 1) * _bond_dtype(self.layout).itemsize

    @property
    def nbytes(self) -> int:
        """Bytes needed to decompress every sample: core values + bond table (module doc)."""
        return self.cores.numel() * self.cores.element_size() + len(self) * self.bond_bytes_per_sample

    def sample_bytes(self, i: int) -> int:
        return (self._offsets[i + 1] - self._offsets[i]) * self.cores.element_size() + self.bond_bytes_per_sample

    @property
    def label_bytes(self) -> int:
        return 0 if self.labels is None else self.labels.numel() * self.labels.element_size()

    # ---- decompression --------------------------------------------------------------------
    def cores_of(self, i: int) -> list[torch.Tensor]:
        """Sample i's cores (r_{k-1}, d_k, r_k), views of `cores` in the storage dtype."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"expected a sample index in [0, {len(self)}), got {i}")
        i %= len(self)
        r = [1, *self.bonds[i].tolist(), 1]
        flat, start, out = self.cores, self._offsets[i], []
        for k, d in enumerate(self.layout.sites):
            size = r[k] * d * r[k + 1]
            out.append(flat[start: start + size].view(r[k], d, r[k + 1]))
            start += size
        return out

    @property
    def out_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == "float64" else torch.float32

    def decompress(self, i: int) -> torch.Tensor:
        """Sample i, shape sample_shape (float32; float64 for float64 storage)."""
        return self.decompress_batch([i])[0]

    def decompress_batch(self, indices=None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Samples `indices` (default: all), shape (B, *sample_shape), in `dtype` (default out_dtype)."""
        idx = list(range(len(self))) if indices is None else [int(i) for i in indices]
        dtype = dtype or self.out_dtype
        if not idx:
            return torch.zeros(0, *self.layout.sample_shape, dtype=dtype)
        parts = []
        for s in range(0, len(idx), _CHUNK):
            samples = [[c.to(dtype) for c in self.cores_of(i)] for i in idx[s: s + _CHUNK]]
            parts.append(self.layout.from_sites(mps_contract_batch(samples, dtype)))  # (B, *sample_shape)
        return torch.cat(parts)

    def summary(self) -> dict:
        n, d = len(self), math.prod(self.layout.sample_shape)
        errors = self.errors if self.errors is not None else torch.zeros(0)
        return {"samples": n, "sample_shape": list(self.layout.sample_shape), "sites": list(self.layout.sites),
                "dtype": self.dtype, "bytes_float32": n * d * 4, "bytes": self.nbytes,
                "bytes_per_sample": self.nbytes / n, "ratio_vs_float32": n * d * 4 / self.nbytes,
                "label_bytes": self.label_bytes,
                "mean_bond": self.bonds.double().mean().item() if self.bonds.numel() else 1.0,
                "max_bond": int(self.bonds.max().item()) if self.bonds.numel() else 1,
                "mean_rel_error": errors.double().mean().item() if errors.numel() else None,
                "max_rel_error": errors.max().item() if errors.numel() else None}

    # ---- files ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> None:
        from safetensors.torch import save

        tensors = {"cores": self.cores.contiguous(), "bonds": self.bonds.to(_bond_dtype(self.layout)).contiguous()}
        if self.labels is not None:
            tensors["labels"] = self.labels.contiguous()
        if self.errors is not None:
            tensors["errors"] = self.errors.to(torch.float32).contiguous()
        description = {"version": VERSION, "layout": self.layout.to_dict(), "dtype": self.dtype, "meta": self.meta}
        write_bytes_atomic(path, save(tensors, metadata={"format": FORMAT, "mps": json.dumps(description)}), overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CompressedSet":
        from safetensors import SafetensorError, safe_open

        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"missing MPS data set file: {path}")
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise ValueError(f"expected an mpokit MPS data set file (format {FORMAT}), got {path} "
                                     f"(format {meta.get('format')!r})")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except SafetensorError as e:
            raise ValueError(f"expected an mpokit MPS data set file, got {path} ({e})") from None
        description = json.loads(meta["mps"])
        if description.get("version") != VERSION:
            raise ValueError(f"expected MPS data set version {VERSION}, got {description.get('version')!r}")
        if description["dtype"] not in STORAGE_DTYPES or "cores" not in tensors or "bonds" not in tensors:
            raise ValueError(f"expected cores, bonds and a storage dtype in {path}, got {sorted(tensors)}")
        return cls(MPSLayout.from_dict(description["layout"]), description["dtype"], tensors["cores"],
                   tensors["bonds"].long(), tensors.get("labels"), tensors.get("errors"), description.get("meta", {}))


def write_bytes_atomic(path: str | os.PathLike, data: bytes, overwrite: bool) -> None:
    """Temporary file beside `path`, fsync, rename into place; an existing `path` only with overwrite."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"expected a file path for the MPS data set, got the folder {path}")
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it (overwrite=True in Python)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def _rel_errors(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N,) ||x_i - y_i|| / ||x_i|| (0 where x_i and y_i are both zero)."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    num, den = torch.linalg.vector_norm(x - y, dim=1), torch.linalg.vector_norm(x, dim=1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.where(num > 0, torch.inf, 0.0))


def _fit_error(vector: torch.Tensor, sites, max_error: float, store: torch.dtype, i: int) -> list[torch.Tensor]:
    """The cheapest rung of the bond ladder (ops.tt.bond_ladder) whose error, measured after the cast to
    the storage dtype, is <= max_error: a binary search over the rungs (their error falls as they grow),
    every answer measured, so the bound holds even where the ladder's error estimate is off."""
    cores, info = mps_svd(vector, sites)
    rungs = [list(c.choice) for c in mps_ladder(info, sites)]  # cheapest first, full bonds last

    def attempt(j: int):
        stored = [c.to(store) for c in mps_truncate(cores, info, rungs[j])[0]]
        return stored, _rel_errors(vector[None], mps_contract_batch([stored], torch.float64)).item() <= max_error

    best, ok = attempt(len(rungs) - 1)
    if not ok:
        raise ValueError(f"expected max_error above the {store} rounding floor, got {max_error:g}: sample {i} "
                         f"misses it even at full bond (use dtype float32 or a larger max_error)")
    lo, hi = 0, len(rungs) - 1  # rungs[hi] meets the bound
    while lo < hi:
        mid = (lo + hi) // 2
        stored, ok = attempt(mid)
        if ok:
            hi, best = mid, stored
        else:
            lo = mid + 1
    return best


def compress_dataset(x: torch.Tensor, *, bytes_per_sample: float | None = None, total_bytes: float | None = None,
                     max_error: float | None = None, dtype: str = "float16", layout: str = "interleaved",
                     labels: torch.Tensor | None = None, progress: bool = False, source: str = "") -> CompressedSet:
    """Compress x (N, *sample_shape) to one MPS per sample; exactly one of the three targets (module doc)."""
    from tqdm.auto import tqdm

    given = [k for k, v in (("bytes_per_sample", bytes_per_sample), ("total_bytes", total_bytes),
                            ("max_error", max_error)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"expected exactly one of bytes_per_sample, total_bytes, max_error, got {given or 'none'}")
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"expected a storage dtype in {tuple(STORAGE_DTYPES)}, got {dtype!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"expected a layout in {LAYOUTS}, got {layout!r}")
    if x.dim() < 2 or x.shape[0] < 1:
        raise ValueError(f"expected a data set of shape (N, ...) with N >= 1 and samples of >= 1 dim, "
                         f"got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        x = x.double()
    if not torch.isfinite(x).all():
        raise ValueError(f"expected finite values, got {(~torch.isfinite(x)).sum().item()} NaN/Inf entries")
    lay = image_layout(tuple(x.shape[1:]), layout)
    n, store = x.shape[0], STORAGE_DTYPES[dtype]
    elem, bond_bytes = store.itemsize, (len(lay.sites) - 1) * _bond_dtype(lay).itemsize
    minimum = mps_params(lay.sites, [1] * (len(lay.sites) - 1)) * elem + bond_bytes  # every bond 1
    vectors = lay.to_sites(x.double())  # (N, prod sites)
    bar = tqdm(total=n, desc="mps: compress", disable=not progress, unit="sample")

    if max_error is not None:
        if not (math.isfinite(max_error) and 0 < max_error):
            raise ValueError(f"expected a finite max_error > 0, got {max_error!r}")
        kept = []
        for i in range(n):
            kept.append(_fit_error(vectors[i], lay.sites, max_error, store, i))
            bar.update()
    else:
        sweeps = []
        for i in range(n):
            sweeps.append(mps_svd(vectors[i], lay.sites))
            bar.update()
        if bytes_per_sample is not None:
            if not bytes_per_sample >= minimum:
                raise ValueError(f"expected bytes_per_sample >= {minimum} (every bond 1 in {dtype} for sites "
                                 f"{list(lay.sites)}), got {bytes_per_sample:g}")
            cap = int((bytes_per_sample - bond_bytes) // elem)
            bonds = [mps_bonds_for_budget(info, lay.sites, cap) for _, info in sweeps]
        else:
            if not total_bytes >= minimum * n:
                raise ValueError(f"expected total_bytes >= {minimum * n} ({n} samples x {minimum} bytes, every bond 1 "
                                 f"in {dtype}), got {total_bytes:g}")
            cap = int((total_bytes - n * bond_bytes) // elem)
            bonds = [list(c.choice) for c in plan([mps_ladder(info, lay.sites) for _, info in sweeps], cap)]
        kept = [[c.to(store) for c in mps_truncate(cores, info, b)[0]] for (cores, info), b in zip(sweeps, bonds)]
    bar.close()

    if any(not torch.isfinite(c).all() for s in kept for c in s):
        raise ValueError(f"expected core values that fit {dtype}, got overflow (use dtype float32)")
    flat = torch.cat([c.reshape(-1) for s in kept for c in s])
    bonds_t = torch.tensor([[c.shape[2] for c in s[:-1]] for s in kept], dtype=torch.long)
    bonds_t = bonds_t.reshape(n, len(lay.sites) - 1)  # (N, n-1), also when there is one site
    target = {k: v for k, v in (("bytes_per_sample", bytes_per_sample), ("total_bytes", total_bytes),
                                ("max_error", max_error)) if v is not None}
    out = CompressedSet(lay, dtype, flat, bonds_t, None if labels is None else labels.long(), None,
                        {"source": source, "target": target, "layout": layout})
    out.errors = _rel_errors(x, out.decompress_batch(dtype=torch.float64)).float()
    return out


class MPSDataset(torch.utils.data.Dataset):
    """A torch Dataset over a CompressedSet that decompresses on the fly: x, or (x, label) with labels.

    DataLoader fetches a batch through __getitems__, which contracts it in one batched pass.
    """

    def __init__(self, compressed: CompressedSet, transform=None):
        self.compressed, self.transform = compressed, transform

    def __len__(self) -> int:
        return len(self.compressed)

    def _item(self, x: torch.Tensor, i: int):
        x = self.transform(x) if self.transform is not None else x
        labels = self.compressed.labels
        return x if labels is None else (x, labels[i])

    def __getitem__(self, i: int):
        return self._item(self.compressed.decompress(i), i)

    def __getitems__(self, indices: list[int]) -> list:
        xs = self.compressed.decompress_batch(indices)
        return [self._item(x, i) for x, i in zip(xs, indices)]


# ---- reading a data set to compress ----------------------------------------------------------
_DATA_KEYS = ("x", "images", "data", "X")
_LABEL_KEYS = ("y", "labels", "target", "targets")


def _pick(arrays: dict, path) -> tuple:
    data = next((arrays[k] for k in _DATA_KEYS if k in arrays), None)
    if data is None:
        rest = [k for k in arrays if k not in _LABEL_KEYS]
        if len(rest) != 1:
            raise ValueError(f"expected one array (or one named {'/'.join(_DATA_KEYS)}) in {path}, "
                             f"got {sorted(arrays)}")
        data = arrays[rest[0]]
    return data, next((arrays[k] for k in _LABEL_KEYS if k in arrays), None)


def read_array(source: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x (N, ...), labels or None) from a .npy/.npz/.safetensors file, or `digits` (scikit-learn's 8x8
    digits, pixel values 0..16, as float32). npz/safetensors: the array named x/images/data (or the
    only one), labels from y/labels/target."""
    import numpy as np

    if source == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        return torch.tensor(d.images, dtype=torch.float32), torch.tensor(d.target, dtype=torch.long)
    p = Path(source)
    if p.is_dir():
        raise IsADirectoryError(f"expected an array file (.npy, .npz, .safetensors) or 'digits', "
                                f"got the folder {source}")
    if not p.is_file():
        raise FileNotFoundError(f"missing input: {source} (expected a .npy, .npz or .safetensors file, or 'digits')")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npy":
            data, labels = np.load(p, allow_pickle=False), None
        elif suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                data, labels = _pick({k: z[k] for k in z.files}, source)
        elif suffix == ".safetensors":
            from safetensors.numpy import load_file

            data, labels = _pick(load_file(str(p)), source)
        else:
            raise ValueError(f"expected a .npy, .npz or .safetensors file or 'digits', got {source}")
    except (ValueError, OSError) as e:
        if "expected" in str(e):
            raise
        raise ValueError(f"expected a readable array file, got {source} ({e})") from None
    except Exception as e:  # noqa: BLE001: safetensors/zip errors on a corrupt file are input errors
        raise ValueError(f"expected a readable array file, got {source} ({type(e).__name__}: {e})") from None
    if data.dtype.kind not in "fiub":
        raise ValueError(f"expected a numeric array in {source}, got dtype {data.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(data))
    y = None if labels is None else torch.from_numpy(np.ascontiguousarray(labels)).long().reshape(-1)
    return (x if x.is_floating_point() else x.double()), y
