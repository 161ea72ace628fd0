"""A flat embedding index: vectors stored as float32, int8 or packed sign bits; exact search by scan.

Binary storage can keep a second, larger copy for rescoring (the usual binary-quantization
recipe): Hamming distance picks k * rescore_multiplier candidates from the 1-bit codes, then the
float query is scored against the candidates' int8 (or float32) vectors and the best k kept.
Only the bits are scanned; the rescoring copy is read for the candidates alone, so it can stay on
disk in a deployment (here it is in memory). Scores are dot products with the float query (cosine,
the vectors being unit length); the binary first stage scores 1 - 2 * hamming / D, the mean sign
agreement, which is the cosine of the two +-1 vectors.

Saved as a folder (written atomically: mpokit.io.atomic): mpokit-index.json (what and how),
vectors.safetensors (codes and int8 ranges, bit-exact) and texts.json (the indexed texts, if any).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from mpokit.embed.codecs import INT8_MODES, Int8Ranges, hamming, pack_signs, packed_bytes

__all__ = ["EmbeddingIndex", "STORAGES", "RESCORES", "INDEX_MARKER", "IndexFileError"]

STORAGES = ("float32", "int8", "binary")
RESCORES = ("none", "int8", "float32")  # binary storage only: the copy candidates are rescored against
INDEX_MARKER = "mpokit-index.json"
FORMAT_VERSION = 1
_QUERY_BLOCK = 64  # queries scored at once: bounds the (Q, N) score matrix
_DOC_BLOCK = 1 << 14  # int8 rows cast to float at once: a bounded temporary


class IndexFileError(ValueError):
    """An index folder that cannot be read, or a query that does not fit the index."""


@dataclass
class EmbeddingIndex:
    dim: int
    storage: str = "float32"
    rescore: str = "none"
    int8_mode: str = "symmetric"  # see mpokit.embed.codecs for why
    rescore_multiplier: int = 4  # binary + rescore: candidates = k * this
    encoder: dict = field(default_factory=dict)  # {"source": ..., "max_length": ...}: how queries are encoded
    ranges: Int8Ranges | None = None
    calibration: str | None = None  # what the int8 ranges were calibrated on
    texts: list[str] | None = None
    codes: torch.Tensor | None = None  # (N, D) float32 | (N, D) int8 | (N, ceil(D/8)) uint8
    rescore_codes: torch.Tensor | None = None  # (N, D) int8 | float32, binary storage with rescoring

    def __post_init__(self):
        if self.storage not in STORAGES:
            raise ValueError(f"expected storage in {STORAGES}, got {self.storage!r}")
        self.rescore = self.rescore or "none"
        if self.rescore not in RESCORES:
            raise ValueError(f"expected rescore in {RESCORES}, got {self.rescore!r}")
        if self.rescore != "none" and self.storage != "binary":
            raise ValueError(f"rescoring needs binary storage (it rescores Hamming candidates), got storage "
                             f"{self.storage!r} with rescore {self.rescore!r}")
        if self.int8_mode not in INT8_MODES:
            raise ValueError(f"expected an int8 mode in {INT8_MODES}, got {self.int8_mode!r}")
        if self.dim < 1 or self.rescore_multiplier < 1:
            raise ValueError(f"expected dim >= 1 and rescore_multiplier >= 1, got {self.dim} and "
                             f"{self.rescore_multiplier}")

    # ---- sizes ------------------------------------------------------------------
    def __len__(self) -> int:
        return 0 if self.codes is None else self.codes.shape[0]

    @property
    def uses_int8(self) -> bool:
        return self.storage == "int8" or self.rescore == "int8"

    @property
    def search_bytes_per_vector(self) -> int:
        """Bytes per vector the first stage scans."""
        return {"float32": 4 * self.dim, "int8": self.dim, "binary": packed_bytes(self.dim)}[self.storage]

    @property
    def bytes_per_vector(self) -> int:
        """Bytes per vector stored: the scanned codes plus the rescoring copy (the int8 ranges are per index)."""
        return self.search_bytes_per_vector + {"none": 0, "int8": self.dim, "float32": 4 * self.dim}[self.rescore]

    # ---- filling ----------------------------------------------------------------
    def calibrate(self, vectors: torch.Tensor, source: str = "given calibration vectors") -> "EmbeddingIndex":
        """Fix the int8 ranges from calibration embeddings (N, D), before anything is added."""
        if len(self):
            raise ValueError("calibrate the int8 ranges before adding vectors (the stored codes use them)")
        self._check_vectors(vectors)
        self.ranges = Int8Ranges.calibrate(vectors, self.int8_mode)
        self.calibration = f"{source} ({vectors.shape[0]} vectors)"
        return self

    def add(self, vectors: torch.Tensor, texts: Sequence[str] | None = None) -> torch.Tensor:
        """Store unit vectors (N, D); returns their ids. Uncalibrated int8 ranges come from this first batch."""
        self._check_vectors(vectors)
        if texts is not None and len(texts) != vectors.shape[0]:
            raise ValueError(f"expected one text per vector, got {len(texts)} texts for {vectors.shape[0]} vectors")
        if len(self) and (texts is None) != (self.texts is None):
            raise ValueError("expected texts for every added batch or for none")
        if self.uses_int8 and self.ranges is None:
            self.calibrate(vectors, "the first added vectors")
        x = vectors.float()
        first = {"float32": lambda: x.clone(), "int8": lambda: self.ranges.quantize(x),
                 "binary": lambda: pack_signs(x)}[self.storage]()
        second = {"none": None, "int8": lambda: self.ranges.quantize(x), "float32": lambda: x.clone()}[self.rescore]
        start = len(self)
        self.codes = first if self.codes is None else torch.cat([self.codes, first])
        if second is not None:
            new = second()
            self.rescore_codes = new if self.rescore_codes is None else torch.cat([self.rescore_codes, new])
        if texts is not None:
            self.texts = (self.texts or []) + list(texts)
        return torch.arange(start, len(self))

    def encode(self, encoder, texts: Sequence[str], batch_size: int = 32, progress: bool = False) -> torch.Tensor:
        """Embed texts with `encoder` (a SentenceEncoder), add them with their texts; returns their ids."""
        if self.encoder and self.encoder.get("source") not in (None, encoder.source):
            raise ValueError(f"this index holds vectors of {self.encoder['source']}, got texts encoded by "
                             f"{encoder.source}")
        if encoder.dim != self.dim:
            raise ValueError(f"expected an encoder of dimension {self.dim}, got {encoder.dim}")
        self.encoder = {"source": encoder.source, "max_length": encoder.max_length}
        return self.add(encoder.encode(texts, batch_size=batch_size, progress=progress), texts)

    # ---- search -----------------------------------------------------------------
    def scores(self, queries: torch.Tensor) -> torch.Tensor:
        """First-stage scores of float queries (Q, D) against every stored vector -> (Q, N)."""
        self._check_vectors(queries)
        if self.storage == "float32":
            return queries.float() @ self.codes.T  # (Q, N)
        if self.storage == "int8":
            blocks = range(0, len(self), _DOC_BLOCK)  # cast a block of codes to float at a time
            return torch.cat([self.ranges.scores(queries, self.codes[s:s + _DOC_BLOCK]) for s in blocks], dim=1)
        ham = hamming(pack_signs(queries), self.codes)  # (Q, N) int32
        return 1 - 2 * ham.float() / self.dim

    def _rescored(self, queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        """Scores of queries (Q, D) against their own candidate rows (Q, C) of the rescoring copy -> (Q, C)."""
        rows = self.rescore_codes[candidates]  # (Q, C, D)
        q = queries.float().unsqueeze(1)  # (Q, 1, D)
        if self.rescore == "float32":
            return (q * rows).sum(-1)
        return (q * self.ranges.scale * rows.float()).sum(-1) + (q * self.ranges.offset).sum(-1)

    def search(self, queries: torch.Tensor, k: int = 10, rescore_multiplier: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The k best ids and their scores for each query: (Q, D) -> (Q, k) int64, (Q, k) float32.

        A single query (D,) gives (k,) results. k larger than the index returns every vector.
        """
        if not len(self):
            raise ValueError("the index is empty: add vectors before searching")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"expected k >= 1, got {k!r}")
        single = queries.dim() == 1
        queries = queries.unsqueeze(0) if single else queries
        self._check_vectors(queries)
        m = rescore_multiplier or self.rescore_multiplier
        k = min(k, len(self))
        ids, scores = [], []
        for s in range(0, queries.shape[0], _QUERY_BLOCK):
            q = queries[s:s + _QUERY_BLOCK].float()  # (q, D)
            first = self.scores(q)  # (q, N)
            if self.rescore == "none":
                top = first.topk(k, dim=1)
                ids.append(top.indices)
                scores.append(top.values)
                continue
            cand = first.topk(min(len(self), k * m), dim=1).indices  # (q, C)
            fine = self._rescored(q, cand)  # (q, C)
            top = fine.topk(k, dim=1)
            ids.append(cand.gather(1, top.indices))
            scores.append(top.values)
        ids, scores = torch.cat(ids), torch.cat(scores)
        return (ids[0], scores[0]) if single else (ids, scores)

    def search_texts(self, encoder, queries: Sequence[str], k: int = 10, **kw) -> tuple[torch.Tensor, torch.Tensor]:
        return self.search(encoder.encode(list(queries)), k, **kw)

    def _check_vectors(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.dim or not x.is_floating_point():
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected float vectors of shape (N, {self.dim}), got {shape}")

    # ---- files ------------------------------------------------------------------
    def meta(self) -> dict:
        return {"format": "mpokit-embedding-index", "version": FORMAT_VERSION, "dim": self.dim, "count": len(self),
                "storage": self.storage, "rescore": self.rescore, "rescore_multiplier": self.rescore_multiplier,
                "int8_mode": self.int8_mode if self.uses_int8 else None, "calibration": self.calibration,
                "encoder": self.encoder, "bytes_per_vector": self.bytes_per_vector,
                "search_bytes_per_vector": self.search_bytes_per_vector, "has_texts": self.texts is not None}

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the index folder atomically; an existing index is replaced only with overwrite=True."""
        from safetensors.torch import save_file

        from mpokit.io.atomic import atomic_dir

        if not len(self):
            raise ValueError("refusing to save an empty index")
        tensors = {"codes": self.codes.contiguous()}
        if self.rescore_codes is not None:
            tensors["rescore_codes"] = self.rescore_codes.contiguous()
        if self.ranges is not None:
            tensors.update(int8_scale=self.ranges.scale.contiguous(), int8_offset=self.ranges.offset.contiguous())
        with atomic_dir(path, overwrite=overwrite, marker=INDEX_MARKER, what="an mpokit embedding index") as tmp:
            save_file(tensors, str(tmp / "vectors.safetensors"))
            if self.texts is not None:
                (tmp / "texts.json").write_text(json.dumps(self.texts, ensure_ascii=False), encoding="utf-8")
            (tmp / INDEX_MARKER).write_text(json.dumps(self.meta(), indent=2) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EmbeddingIndex":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from mpokit.io.atomic import recover

        path = Path(path)
        recover(path)
        if not (path / INDEX_MARKER).is_file():
            what = "no such folder" if not path.exists() else f"no {INDEX_MARKER} in it"
            raise FileNotFoundError(f"expected an index folder written by `mpokit embed index`, got {path} ({what})")
        try:
            meta = json.loads((path / INDEX_MARKER).read_text())
            tensors = load_file(str(path / "vectors.safetensors"))
            texts = json.loads((path / "texts.json").read_text(encoding="utf-8")) if meta.get("has_texts") else None
        except (ValueError, SafetensorError, OSError) as e:
            raise IndexFileError(f"cannot read the index {path}: {type(e).__name__}: {e}") from None
        if meta.get("format") != "mpokit-embedding-index" or meta.get("version") != FORMAT_VERSION:
            raise IndexFileError(f"expected an mpokit embedding index of version {FORMAT_VERSION} in {path}, got "
                              f"{meta.get('format')!r} version {meta.get('version')!r}")
        ranges = None
        if "int8_scale" in tensors:
            ranges = Int8Ranges(tensors["int8_scale"], tensors["int8_offset"], meta["int8_mode"])
        index = cls(dim=meta["dim"], storage=meta["storage"], rescore=meta["rescore"],
                    int8_mode=meta["int8_mode"] or "symmetric", rescore_multiplier=meta["rescore_multiplier"],
                    encoder=meta.get("encoder") or {}, ranges=ranges, calibration=meta.get("calibration"),
                    texts=texts, codes=tensors["codes"], rescore_codes=tensors.get("rescore_codes"))
        index._check_loaded(path, meta)
        return index

    def _check_loaded(self, path: Path, meta: dict) -> None:
        want = {"float32": (torch.float32, self.dim), "int8": (torch.int8, self.dim),
                "binary": (torch.uint8, packed_bytes(self.dim))}[self.storage]
        problems = []
        if self.codes.dtype != want[0] or self.codes.dim() != 2 or self.codes.shape[1] != want[1]:
            problems.append(f"codes {self.codes.dtype} {tuple(self.codes.shape)}, expected {want[0]} (N, {want[1]})")
        if len(self) != meta.get("count"):
            problems.append(f"{len(self)} vectors, expected {meta.get('count')}")
        if self.uses_int8 and self.ranges is None:
            problems.append("no int8 ranges")
        if self.rescore != "none" and (self.rescore_codes is None or self.rescore_codes.shape[0] != len(self)):
            problems.append("no rescoring vectors for every code")
        if self.texts is not None and len(self.texts) != len(self):
            problems.append(f"{len(self.texts)} texts for {len(self)} vectors")
        if problems:
            raise IndexFileError(f"the index {path} is inconsistent: {'; '.join(problems)}")
