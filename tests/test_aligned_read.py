"""io/aligned_read.py: safetensors files read into fresh aligned tensors, equal to safetensors' own loader."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from mpokit.io.aligned_read import read_tensors


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(5, 7, generator=g), "b": torch.randn(3, generator=g).half(),
            "c": torch.randint(0, 255, (9, 4), generator=g).to(torch.uint8), "d": torch.randn(2, 2).bfloat16(),
            "e": torch.zeros(0, 3), "f": torch.arange(6, dtype=torch.int64).reshape(2, 3)}


def test_equal_to_safetensors_and_aligned(tmp_path):
    save_file(_tensors(), tmp_path / "m.safetensors", metadata={"format": "pt"})
    ours, theirs = read_tensors(tmp_path / "m.safetensors"), load_file(tmp_path / "m.safetensors")
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
        assert ours[k].numel() == 0 or ours[k].data_ptr() % 64 == 0, k


def test_truncated_or_garbled_files_are_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(_tensors(), path)
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    with pytest.raises(ValueError, match="fit|ends"):
        read_tensors(path)
    path.write_bytes(b"\xff" * 8 + data[8:])
    with pytest.raises(ValueError, match="header"):
        read_tensors(path)
