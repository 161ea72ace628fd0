"""Stream calibration block by block through a model's repeated layers.

Instead of holding a Gram matrix for every layer of the model at once, the
calibration hidden states (tokens x hidden, a few MB) are captured at the input of the
first block and pushed through one block at a time: only that block's statistics
exist at any moment, and a caller may compress the block before its outputs feed the
next one (so later layers calibrate on what the compressed model really computes).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from mpokit.calibration.activations import Activations
from mpokit.calibration.stats import GramAccumulator, InputStats
from mpokit.surgery.offload import input_device, resident
from mpokit.surgery.targets import find_blocks

__all__ = ["find_blocks", "stream_blocks", "capture_block_inputs", "run_block"]


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model, blocks, batches) -> tuple[Activations, list[dict]]:
    """The first block's input hidden states (one per batch; on disk under offload_activations) and the keyword
    arguments the model passes every block (masks, position embeddings: small, kept in memory)."""
    hiddens, kwargs_list = Activations(), []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        hiddens.append(hidden.detach())
        kwargs_list.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    # prepend: stop before a streamed model's own hook would load block 0 just to be interrupted
    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True, prepend=True)
    device = input_device(model)
    try:
        for batch in batches:
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return hiddens, kwargs_list


def run_block(block, hidden, kwargs) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _block_pass(model, block, local, hiddens, kwargs_list, ref_hiddens, tokens, on_block, i):
    """One block: its layers' Grams (and reference cross Grams), on_block, and the block's outputs
    (Activations; the reference outputs None without a reference stream)."""
    acc = GramAccumulator(model, local)
    outputs = Activations()
    ref_outputs = Activations() if ref_hiddens is not None else None
    try:
        for k, kwargs in enumerate(kwargs_list):
            if ref_hiddens is not None:  # original block on original inputs: record layer inputs
                acc.new_forward()
                acc.recording = {}
                ref_outputs.append(run_block(block, ref_hiddens[k], kwargs))
                acc.reference, acc.recording = acc.recording, None
            acc.new_forward()
            outputs.append(run_block(block, hiddens[k], kwargs))
    finally:
        acc.detach()
    acc.stats.tokens = tokens
    if local and on_block(i, local, acc.stats):
        outputs.release()
        outputs = Activations(run_block(block, hiddens[k], kwargs) for k, kwargs in enumerate(kwargs_list))
    return outputs, ref_outputs


@torch.no_grad()
def stream_blocks(model: nn.Module, names: list[str], batches: list[torch.Tensor],
                  on_block: Callable[[int, list[str], InputStats], bool], progress: bool = True,
                  desc: str = "calibration", reference: bool = False) -> list[str]:
    """For each block: collect input Grams of its layers among `names`, call on_block(i, names, stats).

    on_block returns True if it changed the block; the block's outputs are then
    recomputed so the next block sees the changed model. With reference=True a second
    stream runs the blocks as they were before on_block changed them (the original
    model), and stats.cross holds X_ref^T X for each layer, so a method can fit
    M X ~ W X_ref (correcting upstream error) instead of M X ~ W X.
    Returns the names that lie outside the blocks (the caller handles those another way).
    """
    prefix, blocks = find_blocks(model)
    hiddens, kwargs_list = capture_block_inputs(model, blocks, batches)
    ref_hiddens = hiddens if reference else None  # both streams start from the same inputs
    tokens = sum(b.numel() for b in batches)
    inside = set()
    for i, block in enumerate(tqdm(blocks, desc=desc, disable=not progress)):
        block_prefix = f"{prefix}.{i}."
        local = [n for n in names if n.startswith(block_prefix)]
        inside.update(local)
        with resident(model, block):  # a streamed model loads this block now and drops it after
            outputs, ref_outputs = _block_pass(model, block, local, hiddens, kwargs_list, ref_hiddens, tokens,
                                               on_block, i)
        for used in {id(s): s for s in (hiddens, ref_hiddens) if s is not None}.values():
            used.release()
        hiddens, ref_hiddens = outputs, ref_outputs
    hiddens.release()
    if ref_hiddens is not None:
        ref_hiddens.release()
    return [n for n in names if n not in inside]
