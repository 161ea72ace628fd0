"""Parameter and byte counts that count shared tensors once and packed storage honestly."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["count_params", "param_bytes", "size_report", "stored_tensors", "peak_rss_mb"]


def count_params(model: nn.Module) -> int:
    """Parameters, each shared Parameter once (tied embeddings count once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def stored_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The tensors a checkpoint stores: the state dict (parameters and persistent buffers, e.g.
    packed quantized codes and their scales), each shared tensor once, by the same key as
    io.checkpoint uses to store shared tensors under one name."""
    out, seen = [], set()
    for t in model.state_dict(keep_vars=True).values():
        if not t.numel():
            key = None
        elif t.is_meta:  # a block-streamed model's weights still in their file: no address, tied ones are one object
            key = id(t)
        else:
            key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        out.append(t)
    return out


def param_bytes(model: nn.Module) -> int:
    """Bytes of stored weights, as the saved weights file holds them: packed codes, 16-bit scales
    and float tensors at their element size, every shared tensor (tied embeddings, shared MPO
    cores) once."""
    return sum(t.numel() * t.element_size() for t in stored_tensors(model))


def size_report(model: nn.Module) -> dict:
    return {"params": count_params(model), "bytes": param_bytes(model)}


def peak_device_mb() -> float | None:
    """Peak memory that torch allocated on the current CUDA device so far, in MiB; None without CUDA use.
    RSS does not see accelerator memory, so a GPU run reports both."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process so far, in MiB (Linux VmHWM), None where it cannot be read.
    Not getrusage's ru_maxrss: Linux carries that across fork + exec, so a child reports its parent's peak."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None
