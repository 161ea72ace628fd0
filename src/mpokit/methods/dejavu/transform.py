"""Neuron-sparse FFNs: each FFN becomes a NeuronSparseFFN whose selector is fit on calibration."""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from mpokit.calibration.stats import resolve_calibration
from mpokit.data import Calibration, as_calibration
from mpokit.layers.sparse_ffn import GATED_SELECTORS, LOWRANK_SELECTORS, NeuronSparseFFN
from mpokit.methods.base import LayerRecord, Report, register
from mpokit.methods.dejavu.config import DejaVuConfig
from mpokit.methods.dejavu.predictor import selection_quality, train_predictor
from mpokit.methods.moefication.router import collect_ffn_inputs
from mpokit.ops.ridge import MaskedRidge
from mpokit.surgery.ffn import find_ffns, install_ffn, read_ffn
from mpokit.surgery.offload import resident
from mpokit.surgery.replace import get_module

__all__ = ["sparsify_ffns_", "sparsify_site", "refit_down_"]

CHUNK = 1024


@register(DejaVuConfig)
def sparsify_ffns_(model: nn.Module, config: DejaVuConfig, tokenizer=None, calibration: Calibration | None = None,
                   *, progress: bool = True) -> Report:
    """Replace every targeted FFN by a NeuronSparseFFN in place (calibration: text or token batches)."""
    calibration = as_calibration(calibration)
    sites = find_ffns(model, config.target_modules, config.exclude_modules)
    if config.selector in GATED_SELECTORS:
        ungated = [s.name for s in sites if s.kind != "gated"]
        if ungated:
            raise ValueError(f"expected gated FFNs for selector={config.selector!r}, got {ungated[0]} without "
                             "gate weights")
    batches = resolve_calibration(calibration, tokenizer, config.calibration_tokens, config.calibration_context,
                                  "dejavu")
    inputs = collect_ffn_inputs(model, sites, batches, progress, desc="dejavu: calibration")
    report = Report(method=config.method)
    for i, site in enumerate(tqdm(sites, desc="dejavu: neuron selectors", disable=not progress)):
        with resident(model, get_module(model, site.module_name)):  # a streamed model loads one FFN at a time
            report.layers.append(sparsify_site(model, site, inputs.pop(site.module_name), config, i))
    active = sum(r.detail["active_params"] for r in report.layers)
    report.extra.update({
        "selector": config.selector, "keep_fraction": config.keep_fraction, "refit": config.refit,
        "ffn_active_params": active, "ffn_active_ratio": active / max(report.params_before, 1),
        "mean_recall": sum(r.detail["recall"] for r in report.layers) / len(report.layers),
        "calibration_tokens": sum(b.numel() for b in batches),
    })
    return report


@torch.no_grad()
def _hidden(layer: NeuronSparseFFN, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([layer.hidden_states(x[i:i + CHUNK].to(layer.w_in)).float() for i in range(0, len(x), CHUNK)])


def sparsify_site(model: nn.Module, site, x: torch.Tensor, config: DejaVuConfig, i: int) -> LayerRecord:
    dense = read_ffn(model, site)
    keep = max(1, round(config.keep_fraction * dense.neurons))
    with torch.random.fork_rng(devices=[]):  # the predictor's initial weights: from the seed, not the global RNG
        torch.manual_seed(config.seed + i)
        layer = NeuronSparseFFN.from_dense(dense, keep, config.selector, config.predictor_rank, site.kind,
                                           config.gather_tokens)
    hidden = _hidden(layer, x)  # (T, N) dense activations
    layer.static_scores.copy_(hidden.abs().mean(0))
    if config.selector in LOWRANK_SELECTORS:
        layer.fit_lowrank_(x)
    if config.selector == "predictor":
        quality = train_predictor(layer, x, hidden, config.predictor_steps, config.predictor_lr,
                                  config.predictor_batch, seed=config.seed + i)
    else:
        with torch.no_grad():
            scores = torch.cat([layer.scores(x[j:j + CHUNK].to(layer.w_in), hidden=hidden[j:j + CHUNK]).float().cpu()
                                for j in range(0, len(x), CHUNK)])  # the oracle's hidden: not computed again
        quality = selection_quality(scores, hidden.cpu(), keep)
    del hidden
    if config.refit:
        quality.update(refit_down_(layer, x, config.refit_ridge))
    install_ffn(model, site, layer)
    return LayerRecord(
        name=site.module_name, kind="neuron-sparse", shape=(dense.neurons, dense.hidden),
        params_before=dense.numel(), params_after=sum(t.numel() for t in layer.state_dict().values()),
        detail={"keep": keep, "selector": config.selector, "active_params": layer.active_params(),
                **{k: v for k, v in quality.items() if k in ("recall", "mass", "loss") or k.startswith("rel_error")}})


@torch.no_grad()
def refit_down_(layer: NeuronSparseFFN, x: torch.Tensor, ridge: float = 0.01) -> dict[str, float]:
    """Refit layer.down_t and an output bias in place so that, with its selector's choice on the calibration
    inputs x (T, d), the layer best reproduces the dense FFN; the relative output errors before and after."""
    acc = MaskedRidge(layer.down_t, layer.b_out, ridge)
    for i in range(0, x.shape[0], CHUNK):
        acc.add(*layer.split_hidden(x[i:i + CHUNK].to(layer.w_in)))
    w, b, errors = acc.solve()
    layer.down_t.copy_(w)
    if layer.b_out is None:
        layer.b_out = nn.Parameter(torch.zeros(layer.out_features, device=layer.w_in.device, dtype=layer.w_in.dtype))
    layer.b_out.copy_(b)
    return errors
