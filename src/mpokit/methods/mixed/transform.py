"""The mixed byte budget: measure every layer's candidates, plan one cap, build the plan block by block.

Pass 0: the output-side loss weights (one backward pass, as the default method). Pass 1 streams
calibration through the dense blocks and measures each layer's candidates (candidates.py) on its
input Gram. ops/budget.plan picks one per layer under the byte cap. Pass 2 streams again and
builds each block's chosen layouts on the inputs the already-compressed blocks produce. The
vocabulary tables are quantized first (round to nearest, outside the cap), as QuantConfig does.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from mpokit.calibration.blocks import stream_blocks
from mpokit.calibration.fisher import loss_row_weights
from mpokit.calibration.stats import collect_input_stats
from mpokit.data import Calibration, as_calibration
from mpokit.layers.quant import QuantLinear
from mpokit.layers.quant_mpo import QuantMPOLinear
from mpokit.methods.base import LayerRecord, Report, register
from mpokit.methods.mixed.candidates import (Grid, dense_cost, dequantized, gptq_codes, layer_candidates,
                                             lowrank_codes, lowrank_cost, lowrank_ranks, walk, weighted_error)
from mpokit.methods.mixed.config import MixedConfig
from mpokit.methods.quant.config import QuantConfig
from mpokit.methods.quant.embeddings import quantize_vocab_, vocab_tables
from mpokit.methods.quant.transform import Recorder, calibration_windows, check_unshared, fitted_group
from mpokit.ops.budget import Candidate, plan
from mpokit.surgery.replace import get_module, set_module
from mpokit.surgery.targets import find_targets, weight_matrix

__all__ = ["mixed_compress_", "lowrank_layer"]


def _linear_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def lowrank_layer(codes, bias: torch.Tensor | None, dtype: torch.dtype) -> QuantMPOLinear:
    """The two-core QuantMPOLinear (out,1)x(1,in) holding A (core 0) and B (core 1) as packed codes."""
    out, rank = codes.second.codes.shape
    inp = codes.first.codes.shape[1]
    q = codes.first
    layer = QuantMPOLinear(inp, out, [out, 1], [1, inp], [rank], [0, 1], q.bits, q.group_size,
                           symmetric=q.offset is None, bias=bias is not None, device=q.codes.device, dtype=dtype)
    layer.qcores["0"].set_quantized(codes.second)  # (out, rank)
    layer.qcores["1"].set_quantized(codes.first)  # (rank, in)
    if bias is not None:
        layer.bias.data.copy_(bias.detach())
    return layer


class _Factors:
    """GPTQ's walk factor once per input Gram (q/k/v and gate/up read the same input)."""

    def __init__(self):
        self._done: dict[tuple, tuple] = {}

    def get(self, gram: torch.Tensor, grid: Grid):
        key = (gram.data_ptr(), tuple(gram.shape))
        if key not in self._done:
            self._done[key] = (gram, walk(gram, grid))  # the Gram is kept, so its address stays unique
        return self._done[key][1]


class _Planner:
    """Pass 1: candidates of every layer from the dense model's statistics."""

    def __init__(self, model: nn.Module, config: MixedConfig, rows: dict[str, torch.Tensor]):
        self.model, self.config, self.rows = model, config, rows
        self.candidates: dict[str, list[Candidate]] = {}

    def grid(self, cols: int) -> Grid:
        c = self.config
        return Grid(fitted_group(cols, c.group_size), c.damp, c.act_order, c.clip_search)

    def ranks(self, out: int, inp: int) -> list[int]:
        c = self.config
        return lowrank_ranks(out, inp, self.grid(inp).group_size, c.max_rank_fraction, c.max_ranks) \
            if c.factor_bits else []

    def cheapest(self, out: int, inp: int) -> int:
        """Bytes of the layer's cheapest candidate (from its shape alone)."""
        grid, c = self.grid(inp), self.config
        g = grid.group_size
        return min([dense_cost(out, inp, b, grid.dense(b, inp).group_size) for b in c.bits_choices] +
                   [lowrank_cost(out, inp, r, b, g) for r in self.ranks(out, inp) for b in c.factor_bits])

    def __call__(self, _, local: list[str], stats) -> bool:
        c = self.config
        factors = _Factors()
        for n in local:
            w = weight_matrix(get_module(self.model, n)).detach().float()
            gram, grid = stats.gram(n), self.grid(w.shape[1])
            self.candidates[n] = layer_candidates(w, gram, self.rows.get(n), c.bits_choices, c.factor_bits,
                                                  self.ranks(*w.shape), grid, c.exact_candidates,
                                                  factors.get(gram, grid))
        return False  # statistics only


class _Builder:
    """Pass 2: builds each layer's planned layout; one LayerRecord per layer."""

    def __init__(self, model: nn.Module, planner: _Planner, choices: dict[str, Candidate], report: Report):
        self.model, self.planner, self.choices, self.report = model, planner, choices, report
        self.bytes_before = self.bytes_after = self.weights = 0

    def __call__(self, _, local: list[str], stats) -> bool:
        factors = _Factors()
        for n in local:
            gram = stats.gram(n)
            self._layer(n, gram, factors.get(gram, self.planner.grid(gram.shape[0])))
        return bool(local)

    def _layer(self, name: str, gram: torch.Tensor, factor) -> None:
        module = get_module(self.model, name)
        w = weight_matrix(module).detach()
        bias = getattr(module, "bias", None)
        grid = self.planner.grid(w.shape[1])
        choice = self.choices[name]
        rows = self.planner.rows.get(name)
        if choice.choice[0] == "gptq":
            q = gptq_codes(w.float(), gram, choice.choice[1], grid.dense(choice.choice[1], w.shape[1]), factor)
            new, w_hat, detail = QuantLinear.from_quantized(q, bias, dtype=w.dtype), dequantized(q), {}
        else:
            _, rank, bits = choice.choice
            codes = lowrank_codes(w.float(), gram, rows, rank, bits, grid, factor=factor)
            new = lowrank_layer(codes, bias, w.dtype)
            w_hat, detail = dequantized(codes.second) @ dequantized(codes.first), {"rank": rank}
        new.orig_type = type(module).__name__
        set_module(self.model, name, new)
        before, after = w.numel() * w.element_size(), new.storage_bytes()
        self.bytes_before, self.bytes_after, self.weights = self.bytes_before + before, self.bytes_after + after, \
            self.weights + w.numel()
        energy = weighted_error(w, torch.zeros_like(w), gram, rows)
        err = weighted_error(w, w_hat, gram, rows)
        kind = "gptq" if choice.choice[0] == "gptq" else "lowrank-gptq"
        params = w.numel() if kind == "gptq" else detail["rank"] * sum(w.shape)
        self.report.layers.append(LayerRecord(
            name, kind, tuple(w.shape), w.numel(), params, (err / energy) ** 0.5 if energy > 0 else 0.0,
            {**detail, "bits": choice.choice[-1], "group_size": new.group_size, "bytes_before": before,
             "bytes_after": after, "bits_per_weight": 8 * after / w.numel(), "planned_loss": choice.error,
             "loss": err}))


def _vocab_(model: nn.Module, config: MixedConfig, tables, report: Report) -> tuple[int, int]:
    """Quantize the vocabulary tables as QuantConfig(embeddings=...) does; (bytes before, after)."""
    if tables is None:
        return 0, 0
    quant = QuantConfig(embeddings=config.embeddings, embedding_group_size=config.embedding_group_size,
                        clip_search=config.clip_search)
    recorder = Recorder(model, quant)
    quantize_vocab_(model, quant, tables, recorder)
    report.layers.extend(recorder.report.layers)
    report.extra.update(recorder.report.extra)
    return recorder.bytes_before, recorder.bytes_after


def _read_candidates(candidates: dict[str, list], names: list[str]) -> dict[str, list[Candidate]]:
    """report.extra["candidates"] of an earlier run, back as Candidates; its layers must be these targets."""
    if sorted(candidates) != sorted(names):
        missing, extra = sorted(set(names) - set(candidates)), sorted(set(candidates) - set(names))
        raise ValueError(f"expected candidates for exactly the targeted layers, got {len(missing)} missing "
                         f"{missing[:2]} and {len(extra)} others {extra[:2]}")
    return {n: [Candidate(float(cost), float(err), tuple(choice)) for cost, err, choice in candidates[n]]
            for n in names}


def _stream(model, names, batches, on_block, desc, progress: bool) -> None:
    outside = stream_blocks(model, names, batches, on_block, progress=progress, desc=desc)
    if outside:  # layers outside the repeated blocks: statistics of the whole model
        on_block(-1, outside, collect_input_stats(model, outside, batches, progress=progress))


@register(MixedConfig)
def mixed_compress_(model: nn.Module, config: MixedConfig, tokenizer=None, calibration: Calibration | None = None,
                    *, calibration_text: str | None = None, batches: list[torch.Tensor] | None = None,
                    progress: bool = True, candidates: dict[str, list] | None = None) -> Report:
    """Compress the targeted linear layers in place to the byte budget; returns the report with
    bits_per_weight (achieved, targeted layers), bytes (the targeted layers and vocabulary tables as
    stored), each layer's choice, and report.extra["candidates"]: every layer's measured candidates,
    which `candidates=` takes back to plan another budget for the same model and calibration
    without measuring again."""
    calibration = as_calibration(calibration, calibration_text, batches)
    report = Report(method=config.method)
    tables = vocab_tables(model) if config.embeddings is not None else None
    names = [n for n in find_targets(model, config.target_modules, config.exclude_modules, types=_linear_types())
             if tables is None or n != tables.head]  # the lm_head goes with the embedding's bits
    check_unshared(model, names)
    windows = calibration_windows(config, tokenizer, calibration, "the mixed byte budget")
    shapes = [tuple(weight_matrix(get_module(model, n)).shape) for n in names]
    weights = sum(o * i for o, i in shapes)
    cap = config.target_bytes if config.target_bytes is not None else config.bits_per_weight * weights / 8
    planner = _Planner(model, config, {})
    floor = sum(planner.cheapest(o, i) for o, i in shapes)
    if floor > cap:  # known from shapes alone: refuse before any calibration work
        raise ValueError(f"expected a budget of at least {8 * floor / weights:.3f} bits per weight ({floor} bytes: "
                         f"every layer at its cheapest candidate), got {8 * cap / weights:.3f} ({int(cap)} bytes)")
    vocab_before, vocab_after = _vocab_(model, config, tables, report)  # before calibration, as QuantConfig does
    planner.rows = loss_row_weights(model, names, windows, config.fisher_tokens, config.fisher_damp,
                                    progress=progress)
    if candidates is None:
        _stream(model, names, windows, planner, "mixed: candidates", progress)
    else:
        planner.candidates = _read_candidates(candidates, names)
    chosen = plan([planner.candidates[n] for n in names], cap)
    builder = _Builder(model, planner, dict(zip(names, chosen)), report)
    _stream(model, names, windows, builder, "mixed: build", progress)
    choices = Counter(" ".join(map(str, c.choice)) for c in chosen)
    report.extra.update(
        bits_per_weight=8 * builder.bytes_after / weights, target_bits_per_weight=8 * cap / weights,
        target_bytes=int(cap), bytes_before=builder.bytes_before + vocab_before,
        bytes_after=builder.bytes_after + vocab_after, linear_bytes=builder.bytes_after,
        bytes=builder.bytes_after + vocab_after, choices=dict(sorted(choices.items())),
        calibration_tokens=sum(b.numel() for b in windows), planned_loss=sum(c.error for c in chosen),
        candidates={n: [[c.cost, c.error, list(c.choice)] for c in planner.candidates[n]] for n in names})
    report.extra["bytes_ratio"] = report.extra["bytes_after"] / max(report.extra["bytes_before"], 1)
    return report
