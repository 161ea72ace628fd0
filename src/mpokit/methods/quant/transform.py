"""Replace targeted Linear/Conv1D layers by QuantLinear, and MPO layers by QuantMPOLinear; with
config.embeddings, the input embedding and lm_head too (embeddings.py).

algorithm="rtn" rounds each weight on its own; "gptq" streams calibration text block by
block (calibration.stream_blocks) and quantizes each block's layers with GPTQ on the
inputs that the already-quantized blocks below produce.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from mpokit.layers.mpo import MPOLinear
from mpokit.layers.quant import QuantLinear
from mpokit.layers.quant_mpo import QuantMPOLinear
from mpokit.methods.base import LayerRecord, Report, register
from mpokit.methods.quant.config import QuantConfig
from mpokit.methods.quant.embeddings import quantize_vocab_, vocab_tables
from mpokit.calibration.blocks import stream_blocks
from mpokit.calibration.stats import collect_input_stats, resolve_calibration
from mpokit.data import Calibration, as_calibration
from mpokit.ops.gptq import gptq_quantize, output_error
from mpokit.ops.quant import DEFAULT_CLIP_RATIOS, fake_quantize, sqnr_db
from mpokit.surgery.offload import resident
from mpokit.surgery.replace import get_module, set_module, shared_outside
from mpokit.surgery.targets import find_targets, weight_matrix

__all__ = ["quant_compress_", "quantize_module", "gptq_module", "fitted_group", "check_unshared", "Recorder",
           "calibration_windows"]

STACK_TOKENS = 1024  # calibration windows are run through the blocks in batches of about this many tokens


def _target_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D, MPOLinear)


def fitted_group(cols: int, group_size: int) -> int:
    """group_size, else the largest multiple of 32 below it dividing cols (else group_size, ragged)."""
    g = group_size
    while cols % g and g > 32:
        g -= 32
    return g if cols % g == 0 else group_size


def quantize_module(module: nn.Module, config: QuantConfig) -> nn.Module:
    """The quantized stand-in for one Linear, Conv1D or MPOLinear."""
    clip = DEFAULT_CLIP_RATIOS if config.clip_search else None
    group = config.group_size  # MPO cores are (r0*o, i*r1) matrices: their rows may keep a short last group
    if config.fit_groups and not isinstance(module, MPOLinear):
        group = fitted_group(weight_matrix(module).shape[1], config.group_size)
    kw = {"bits": config.bits, "group_size": group, "symmetric": config.symmetric, "clip_ratios": clip,
          "zero_point": config.zero_point}
    if isinstance(module, MPOLinear):
        if getattr(module, "tied_to", None):
            raise ValueError("expected an untied MPO layer, got one sharing its cores with another layer")
        new = QuantMPOLinear.from_mpo(module, config.mpo_cores, **kw)
        new.orig_type = getattr(module, "orig_type", "Linear")
        return new
    new = QuantLinear.from_weight(weight_matrix(module), getattr(module, "bias", None),
                                  cache_weight=config.cache_weight, **kw)
    new.orig_type = type(module).__name__
    return new


def _dense_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def calibration_windows(config, tokenizer, calibration: Calibration, what: str = "algorithm='gptq'"
                        ) -> list[torch.Tensor]:
    """The caller's batches as they are, else windows of the text (config.calibration_tokens in windows of
    config.calibration_context) stacked into batches. `what` names the method in errors."""
    windows = resolve_calibration(calibration, tokenizer, config.calibration_tokens, config.calibration_context,
                                  what)
    if calibration.batches is not None:
        return windows
    context = calibration.context if calibration.context is not None else config.calibration_context
    return _stack_windows(windows, max(1, STACK_TOKENS // context))


def _stack_windows(windows: list[torch.Tensor], per_batch: int) -> list[torch.Tensor]:
    """(1, L) windows -> (B, L) batches of equal-length windows: short windows cost one block call per
    batch instead of one each (the statistics are the same)."""
    full = [w for w in windows if w.shape[1] == windows[0].shape[1]]
    rest = windows[len(full):]
    return [torch.cat(full[i:i + per_batch]) for i in range(0, len(full), per_batch)] + rest


def gptq_module(module: nn.Module, gram: torch.Tensor, config: QuantConfig) -> QuantLinear:
    """The GPTQ-quantized QuantLinear for one Linear/Conv1D, given its input Gram X^T X."""
    w = weight_matrix(module).detach()
    group = fitted_group(w.shape[1], config.group_size) if config.fit_groups else config.group_size
    clip = DEFAULT_CLIP_RATIOS if config.clip_search else None
    q = gptq_quantize(w, gram, config.bits, group, config.symmetric, config.zero_point, config.damp, config.act_order,
                      clip_ratios=clip)
    new = QuantLinear.from_quantized(q, getattr(module, "bias", None), cache_weight=config.cache_weight, dtype=w.dtype)
    new.orig_type = type(module).__name__
    return new


class Recorder:
    """Swaps layers in and writes one LayerRecord each, plus byte totals."""

    def __init__(self, model: nn.Module, config: QuantConfig):
        self.model, self.config = model, config
        self.report = Report(method=config.method)
        self.bytes_before = self.bytes_after = 0

    def replace(self, name: str, make, gram: torch.Tensor | None = None, bits: int | None = None,
                kind: str | None = None) -> None:
        module = get_module(self.model, name)
        with torch.no_grad():
            w = module.full_weight() if isinstance(module, MPOLinear) else weight_matrix(module)
            w = w.detach().clone()
        before = _dense_bytes(module)
        new = make(module)
        set_module(self.model, name, new)
        with torch.no_grad():
            w_hat = new.weight.detach()
        err = (w - w_hat).norm().item() / max(w.norm().item(), 1e-30)
        after = new.storage_bytes()
        self.bytes_before, self.bytes_after = self.bytes_before + before, self.bytes_after + after
        detail = {"bits": bits or self.config.bits, "group_size": new.group_size, "sqnr_db": sqnr_db(w, w_hat),
                  "bytes_before": before, "bytes_after": after}
        if gram is not None:  # output error on the calibration inputs, and what RTN would give there
            rtn = fake_quantize(w, self.config.bits, new.group_size, self.config.symmetric,
                                zero_point=self.config.zero_point)
            detail.update(output_rel_error=output_error(w, w_hat, gram), rtn_output_rel_error=output_error(w, rtn, gram))
        kind = kind or ("quant-mpo" if isinstance(new, QuantMPOLinear) else ("gptq" if gram is not None else "quant"))
        self.report.layers.append(LayerRecord(name=name, kind=kind, shape=tuple(w.shape), params_before=w.numel(),
                                              params_after=w.numel(), rel_error=err, detail=detail))

    def finish(self, **extra) -> Report:
        self.report.extra.update(bytes_before=self.bytes_before, bytes_after=self.bytes_after,
                                 bytes_ratio=self.bytes_after / self.bytes_before if self.bytes_before else 1.0,
                                 algorithm=self.config.algorithm, **extra)
        return self.report


def _gptq_compress(model, names, config, recorder, batches, progress) -> None:
    mpo = [n for n in names if isinstance(get_module(model, n), MPOLinear)]
    if mpo:
        raise ValueError(f"expected plain linear layers for algorithm='gptq', got MPO layers {mpo[:3]}; "
                         "use algorithm='rtn' for MPO cores")

    def quantize_block(_, local, stats) -> bool:
        for n in local:
            gram = stats.gram(n)
            recorder.replace(n, lambda m, gram=gram: gptq_module(m, gram, config), gram)
        return True

    outside = stream_blocks(model, names, batches, quantize_block, progress=progress, desc=f"gptq: int{config.bits}")
    if outside:  # layers outside the repeated blocks: statistics of the (already quantized) model
        quantize_block(-1, outside, collect_input_stats(model, outside, batches, progress=progress))


def check_unshared(model: nn.Module, names: list[str]) -> None:
    """Refuse targets whose weights other layers share (tied lm_head/embed_tokens, MPO cores with
    `tied_to` or shared across layers): a quantized copy would untie them, store the matrix twice
    and make the size report false."""
    shared = shared_outside(model, names)
    if shared:
        pairs = "; ".join(f"{n} with {', '.join(o)}" for n, o in list(shared.items())[:3])
        raise ValueError(f"expected targets whose weights no other layer shares, got {pairs}: quantizing "
                         f"{'them' if len(shared) > 1 else 'it'} would untie the shared weight and store it twice. "
                         f"Leave {'them' if len(shared) > 1 else 'it'} out (exclude_modules / --exclude "
                         f"{','.join(shared)}), or use an MPO method (mpo-datafree) that keeps ties")


@register(QuantConfig)
def quant_compress_(model: nn.Module, config: QuantConfig, tokenizer=None, calibration: Calibration | None = None, *,
                   calibration_text: str | None = None, batches: list[torch.Tensor] | None = None,
                   progress: bool = True) -> Report:
    """Quantize the targets in place; algorithm='gptq' reads `calibration` (default: the default calibration
    corpus; the older calibration_text= / batches= still work)."""
    calibration = as_calibration(calibration, calibration_text, batches)
    names = find_targets(model, config.target_modules, config.exclude_modules, types=_target_types())
    tables = vocab_tables(model) if config.embeddings is not None else None
    if tables is not None:  # the lm_head, tied or not, is quantized with the embedding's bits
        names = [n for n in names if n != tables.head]
    check_unshared(model, names)
    recorder = Recorder(model, config)
    if tables is not None:  # before GPTQ, so its calibration inputs come from the quantized embedding
        quantize_vocab_(model, config, tables, recorder)
    if not names:
        return recorder.finish()
    if config.algorithm == "gptq":
        batches = calibration_windows(config, tokenizer, calibration)
        _gptq_compress(model, names, config, recorder, batches, progress)
        return recorder.finish(calibration_tokens=sum(b.numel() for b in batches))
    for name in tqdm(names, desc=f"quant: int{config.bits}", disable=not progress):
        with resident(model, get_module(model, name)):  # a streamed model loads one layer at a time
            recorder.replace(name, lambda m: quantize_module(m, config))
    return recorder.finish()
