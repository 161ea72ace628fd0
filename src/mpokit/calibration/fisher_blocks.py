"""The loss-gradient pass one block at a time (for block-streamed models; the same G as fisher.py).

A whole-model backward holds every block's weights and activations and the full-vocabulary logits
at once. Here: (1) the blocks run forward one by one without gradients, keeping only each block's
input hidden states (tokens x hidden per block); (2) the gradient of the LM loss at the last
block's output is computed with the blocks replaced by stand-ins that return those states, for a
few positions at a time (`logits_to_keep`), so logits never exceed ~16 MB; (3) walking back, each
block is loaded, rerun on its stored input with gradients, and back-propagated from its output
gradient, which gives the next (lower) block's output gradient. This is activation
checkpointing at block granularity, with the weights loaded only during their block's turn.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mpokit.calibration.activations import Activations
from mpokit.calibration.blocks import capture_block_inputs, run_block
from mpokit.surgery.offload import resident
from mpokit.surgery.targets import find_blocks

__all__ = ["blockwise_backward"]

LOGITS_BYTES = 2**24  # float32 logits held at once by the head pass (its softmax and gradient: 3x more)
_LAYER_ATTRS = ("attention_type", "layer_idx", "is_sliding", "sliding_window")  # read off layers by some models


class _Replay(nn.Module):
    """Stands in for a block: passes hidden states through, or (the last one) returns stored states."""

    def __init__(self, block: nn.Module, as_tuple: bool):
        super().__init__()
        self.value, self.as_tuple = None, as_tuple
        for attr in _LAYER_ATTRS:
            if hasattr(block, attr):
                setattr(self, attr, getattr(block, attr))

    def forward(self, hidden_states, *args, **kwargs):
        out = hidden_states if self.value is None else self.value
        return (out,) if self.as_tuple else out


def _head_gradients(model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor], lasts: list[torch.Tensor],
                    as_tuple: bool) -> list[torch.Tensor]:
    """d(summed LM loss)/d(last block's output) for each batch, with logits computed a few positions at a time
    while stand-ins replace the blocks."""
    originals = list(blocks)
    replays = [_Replay(b, as_tuple) for b in originals]
    vocab = model.config.vocab_size  # not the head's .weight: a quantized head would dequantize the whole table
    chunked = "logits_to_keep" in inspect.signature(model.forward).parameters
    grads = []
    try:
        for i, r in enumerate(replays):
            blocks[i] = r
        for batch, last in zip(batches, lasts):
            leaf = last.detach().requires_grad_()
            replays[-1].value = leaf
            n, length = batch.shape
            step = max(1, LOGITS_BYTES // (4 * n * vocab)) if chunked else length
            scale = batch.numel() / (n * (length - 1))  # as fisher.py: the mean loss times the token count
            for start in range(0, length - 1, step):
                positions = torch.arange(start, min(start + step, length - 1), device=batch.device)
                kw = {"logits_to_keep": positions} if chunked else {}
                logits = model(input_ids=batch, use_cache=False, **kw).logits
                if not chunked:
                    logits = logits[:, positions]
                loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, positions + 1].flatten(),
                                       reduction="sum")
                (loss * scale).backward()
            grads.append(leaf.grad)
    finally:
        for i, b in enumerate(originals):
            blocks[i] = b
    return grads


def blockwise_backward(model: nn.Module, batches: list[torch.Tensor], progress: bool = True) -> None:
    """Back-propagate the summed causal-LM loss of each batch through the model block by block.

    Gradient hooks that callers put on layers fire as in a whole-model backward (parameters
    should be frozen: only activation gradients are computed)."""
    _, blocks = find_blocks(model)
    hiddens, kwargs_list = capture_block_inputs(model, blocks, batches)
    states, as_tuple = [], False  # states[i]: block i's inputs (Activations: on disk under offload_activations)
    with torch.no_grad():
        for block in tqdm(blocks, desc="sensitivity: forward", disable=not progress):
            states.append(hiddens)
            hiddens = Activations()
            with resident(model, block):
                for k, kw in enumerate(kwargs_list):
                    out = block(states[-1][k], **kw)
                    as_tuple = isinstance(out, (tuple, list))
                    hiddens.append(out[0] if as_tuple else out)
    last = list(hiddens)
    hiddens.release()
    device = last[0].device
    with torch.enable_grad():
        grads = _head_gradients(model, blocks, [b.to(device) for b in batches], last, as_tuple)
        del last
        for i in tqdm(reversed(range(len(blocks))), total=len(blocks), desc="sensitivity: backward",
                      disable=not progress):
            with resident(model, blocks[i]):
                for k, kw in enumerate(kwargs_list):
                    x = states[i][k].detach().requires_grad_()
                    torch.autograd.backward(run_block(blocks[i], x, kw), grads[k])
                    grads[k] = x.grad
            states[i].release()
            states[i] = None
