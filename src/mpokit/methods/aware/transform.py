"""Activation-aware compression: weighted spectra -> global allocation -> sequential factorization.

Pass 0 (sensitivity="fisher") runs one backward pass of the LM loss and keeps each
layer's output-gradient second moments G, so that layer errors are weighted on both
sides, ||R (W - M) S|| with R^T R = G and S S^T = X^T X: a K-FAC estimate of the loss
increase, comparable across layers. Pass 1 streams calibration through the blocks and
records each layer's weighted singular values. The budget is then allocated across layers. Pass 2 streams again and
factorizes each block with statistics of the inputs the already-compressed blocks
produce, so errors of earlier layers are seen (and partly absorbed) by later ones.
"""
from __future__ import annotations

import torch
from torch import nn

from mpokit.calibration.blocks import stream_blocks
from mpokit.calibration.fisher import loss_row_weights
from mpokit.calibration.stats import InputStats, collect_input_stats, resolve_calibration
from mpokit.data import Calibration, as_calibration
from mpokit.layers.mpo import MPOLinear
from mpokit.methods.aware.allocate import LayerSpectrum, allocate_global, allocate_uniform
from mpokit.methods.aware.config import AwareConfig
from mpokit.methods.aware.refine import mpo_candidate
from mpokit.methods.base import LayerRecord, Report, register
from mpokit.methods.mpo.transform import tie_to
from mpokit.ops.whiten import apply_left, scaled_svd, whitened_svd, whitening_factor
from mpokit.surgery.offload import resident
from mpokit.surgery.replace import get_module, set_module, shared_outside, tied_groups
from mpokit.surgery.targets import find_targets, weight_matrix

__all__ = ["aware_compress_", "weighted_factors", "tied_partners"]

# Products and whitening stay float64; the SVDs of the weighted matrices run in float32
# (about 2x faster on CPU), whose ~1e-7 relative precision is far below any truncation.
SVD_DTYPE = torch.float32


def _input_scale(config: AwareConfig, stats: InputStats | None, name: str):
    """(kind, tensor): the whitening factor S, a per-channel scale, or nothing."""
    if config.scaling == "none" or stats is None:
        return "none", None
    if config.scaling == "diag":
        return "diag", stats.mean_abs_proxy(name).clamp_min(1e-6) ** config.alpha
    return "whiten", whitening_factor(stats.gram(name), config.damp)


def weighted_factors(weight: torch.Tensor, kind: str, scale, left: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W = U diag(sigma) Vt, with sigma the singular values of the weighted W (R W S, R = left)."""
    if kind == "whiten":
        return whitened_svd(weight, scale, left, svd_dtype=SVD_DTYPE)
    w = apply_left(left, weight.double())
    u, s, vt = scaled_svd(w, scale) if kind == "diag" else torch.linalg.svd(w, full_matrices=False)
    return apply_left(left, u, inverse=True), s, vt


def _weighted_sigma(weight, kind, scale, left=None) -> torch.Tensor:
    w = apply_left(left, weight.double())
    if kind == "whiten":
        w = w @ scale
    elif kind == "diag":
        w = w * scale.double()
    return torch.linalg.svdvals(w.to(SVD_DTYPE)).double()


def _output_factors(model, config: AwareConfig, names: list[str], batches) -> dict[str, torch.Tensor]:
    """name -> R (see ops.whiten.output_factor), float32 to halve what is held for all layers."""
    if config.sensitivity == "none":
        return {}
    return loss_row_weights(model, names, batches, config.fisher_tokens, config.fisher_damp, config.fisher_full_max)


def _lowrank_layer(module: nn.Module, u, s, vt, rank: int, forward_mode: str) -> MPOLinear:
    w = weight_matrix(module)
    o, i = w.shape
    root = s[:rank].sqrt()
    a = (u[:, :rank] * root).reshape(1, o, 1, rank)  # (1, O, 1, r)
    b = (root[:, None] * vt[:rank]).reshape(rank, 1, i, 1)  # (r, 1, I, 1)
    bias = getattr(module, "bias", None)
    layer = MPOLinear(i, o, [o, 1], [1, i], [rank], bias=bias is not None, forward_mode=forward_mode,
                      device=w.device, dtype=w.dtype)
    layer.set_cores([a, b])
    if bias is not None:
        layer.bias.data.copy_(bias.detach())
    layer.orig_type = type(module).__name__
    return layer


def _stream(model, names, batches, on_block, progress, desc, reference: bool = False) -> None:
    """Block-by-block statistics; layers outside the blocks get whole-model statistics."""
    outside = stream_blocks(model, names, batches, on_block, progress=progress, desc=desc, reference=reference)
    if outside:
        on_block(-1, outside, collect_input_stats(model, outside, batches, progress=progress))


def _layer_by_layer(model, names, on_block) -> None:
    """Without calibration: on_block(None, [name], None) for each layer, loaded while it runs (streamed models)."""
    for n in names:
        with resident(model, get_module(model, n)):
            on_block(None, [n], None)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def tied_partners(model: nn.Module, names: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(primaries, partners): the targets to factorize, and for each the layers tied to its weight,
    which will share its cores (as MPOConfig does for embed_tokens/lm_head). A target tied to an
    earlier target is not factorized twice. Sharing that is not a whole-weight tie of the same
    orientation is refused: the factorized layer would silently untie it."""
    groups = {n: g for g in tied_groups(model) for n in g}
    primaries, partners, taken = [], {}, set()
    for n in names:
        if n in taken:
            continue
        primaries.append(n)
        others = [o for o in groups.get(n, []) if o != n]
        if others:
            partners[n] = others
            taken.update(others)
    module_of = {n: get_module(model, n) for g in partners.values() for n in g}
    for n, others in partners.items():
        m = get_module(model, n)
        bad = [o for o in others if _is_conv1d(module_of[o]) != _is_conv1d(m)
               or tuple(weight_matrix(module_of[o]).shape) != tuple(weight_matrix(m).shape)]
        if bad:
            raise ValueError(f"expected layers tied to {n} to use its weight the same way, got {bad} "
                             "(transposed use); leave it out of the targets")
    unexplained = {n: [o for o in others if o not in partners.get(n, [])]
                   for n, others in shared_outside(model, primaries).items()}
    unexplained = {n: o for n, o in unexplained.items() if o}
    if unexplained:
        raise ValueError(f"expected targets whose weights are tied whole or not at all, got {unexplained}: "
                         "factorizing them would untie the shared tensors; leave them out of the targets")
    return primaries, partners


def _left(lefts: dict[str, torch.Tensor], name: str) -> torch.Tensor | None:
    return lefts[name].double() if name in lefts else None


def _aware_targets(model: nn.Module, config: AwareConfig) -> tuple[list[str], dict[str, list[str]]]:
    """(primaries, partners) of the targeted linear layers; embeddings are refused."""
    names = find_targets(model, config.target_modules, config.exclude_modules)
    embeddings = [n for n in names if isinstance(get_module(model, n), nn.Embedding)]
    if embeddings:
        raise ValueError(f"expected linear layers for activation-aware compression, got embeddings {embeddings}; "
                         "use MPOConfig (data-free) for embeddings")
    return tied_partners(model, names)


def _allocate_ranks(model, config: AwareConfig, names: list[str], batches, lefts, progress: bool
                    ) -> dict[str, int | None]:
    """Pass 1: each layer's weighted spectrum, then the budget split across layers (None: keep dense)."""
    spectra: dict[str, LayerSpectrum] = {}

    def record_spectra(_, local, stats):
        for n in local:
            w = weight_matrix(get_module(model, n)).detach()
            sigma = _weighted_sigma(w, *_input_scale(config, stats, n), _left(lefts, n))
            spectra[n] = LayerSpectrum(w.shape[0], w.shape[1], sigma)
        return False  # statistics only: the block's outputs are unchanged

    if config.allocation == "uniform":  # ranks follow from shapes alone: no spectra pass
        for n in names:
            w = weight_matrix(get_module(model, n))
            spectra[n] = LayerSpectrum(w.shape[0], w.shape[1], torch.empty(0))
    elif batches is not None:
        _stream(model, names, batches, record_spectra, progress, "spectra")
    else:
        _layer_by_layer(model, names, record_spectra)
    if config.allocation == "global":
        return allocate_global(spectra, config.budget, normalize=config.error_norm == "relative")
    return allocate_uniform(spectra, config.budget)


def _corrected_target(w: torch.Tensor, stats: InputStats | None, name: str, kind: str, ridge: float) -> torch.Tensor:
    """W, or when inputs of the original model are known (cross Gram C), the target that makes
    M X ~ W X_ref: ridge least-squares W (C + lI)(G + lI)^-1."""
    cross = stats.cross_gram(name) if stats is not None and kind == "whiten" else None
    if cross is None:
        return w
    gram = stats.gram(name)
    lam = ridge * torch.diagonal(gram).mean()
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    chol = torch.linalg.cholesky(gram + lam * eye)
    return torch.cholesky_solve((cross + lam * eye).T @ w.double().T, chol).T.to(w.dtype)


def _factorize(module: nn.Module, w: torch.Tensor, kind: str, scale, rank: int, config: AwareConfig,
               left: torch.Tensor | None) -> tuple[MPOLinear, str, float]:
    """(layer, layout, relative weighted error): the rank-`rank` two-core layer, or an MPO layer of
    no more parameters when config.layouts allows it and it does better."""
    u, s, vt = weighted_factors(w, kind, scale, left)
    err = float((s[rank:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt().clamp_min(1e-30))
    new = _lowrank_layer(module, u, s, vt, rank, config.forward_mode)
    if "mpo" in config.layouts and kind == "whiten" and w.shape[1] >= config.mpo_min_in_ratio * w.shape[0]:
        cand = mpo_candidate(w, scale, new.core_params(), err, config.refine_steps, config.forward_mode, left=left)
        if cand is not None:
            new, err = cand
            new.orig_type = type(module).__name__
            if getattr(module, "bias", None) is not None:
                new.bias = nn.Parameter(module.bias.detach().clone())
            return new, "mpo", err
    return new, "lowrank", err


class _BlockCompressor:
    """Pass 2: factorizes each layer of a block to its allocated rank; keeps the report and byte totals."""

    def __init__(self, model: nn.Module, config: AwareConfig, ranks: dict[str, int | None],
                 lefts: dict[str, torch.Tensor], partners: dict[str, list[str]]):
        self.model, self.config, self.ranks, self.lefts, self.partners = model, config, ranks, lefts, partners
        self.report = Report(method=config.method)
        self.tied: dict[str, str] = {}
        self.sizes = {"bytes_before": 0, "bytes_after": 0}

    def __call__(self, _, local: list[str], stats: InputStats | None) -> bool:
        """on_block of calibration.stream_blocks: True when the block's layers changed."""
        changed = False
        for n in local:
            changed = self._layer(n, stats) or changed
        return changed

    def _layer(self, n: str, stats: InputStats | None) -> bool:
        module = get_module(self.model, n)
        w = weight_matrix(module).detach()
        dense = w.numel()
        self.sizes["bytes_before"] += dense * w.element_size()
        if self.ranks[n] is None:
            self.sizes["bytes_after"] += dense * w.element_size()
            self.report.layers.append(LayerRecord(n, "dense", tuple(w.shape), dense, dense, 0.0))
            return False
        kind, scale = _input_scale(self.config, stats, n)
        w = _corrected_target(w, stats, n, kind, self.config.correct_ridge)
        new, layout, err = _factorize(module, w, kind, scale, self.ranks[n], self.config, _left(self.lefts, n))
        set_module(self.model, n, new)
        for other in self.partners.get(n, []):  # tied weights (lm_head <-> embed_tokens) share the cores
            set_module(self.model, other, tie_to(new, get_module(self.model, other), n))
            self.tied[other] = n
        self.sizes["bytes_after"] += sum(c.numel() * c.element_size() for c in new.cores)  # shared cores once
        self.report.layers.append(LayerRecord(n, layout, tuple(w.shape), dense, new.core_params(), err,
                                              {"bonds": new.bonds, "out_dims": new.out_dims, "in_dims": new.in_dims,
                                               "tied": self.partners.get(n, [])}))
        return True

    def finish(self, batches) -> Report:
        sizes = self.sizes
        self.report.extra.update(calibration_tokens=sum(b.numel() for b in batches) if batches else 0,
                                 dense_layers=sum(r is None for r in self.ranks.values()),
                                 sensitivity=self.config.sensitivity, tied=self.tied, **sizes,
                                 bytes_ratio=sizes["bytes_after"] / sizes["bytes_before"] if sizes["bytes_before"]
                                 else 1.0)
        return self.report


@register(AwareConfig)
def aware_compress_(model: nn.Module, config: AwareConfig, tokenizer=None, calibration: Calibration | None = None, *,
                   calibration_text: str | None = None, batches: list[torch.Tensor] | None = None,
                   progress: bool = True) -> Report:
    """Compress the targeted linear layers in place. calibration: text or token batches (default: the
    default calibration corpus), read when config.needs_calibration; the older calibration_text= / batches=
    still work."""
    calibration = as_calibration(calibration, calibration_text, batches)
    names, partners = _aware_targets(model, config)
    batches = (resolve_calibration(calibration, tokenizer, config.calibration_tokens, config.calibration_context,
                                   "activation-aware compression")
               if config.needs_calibration else None)
    lefts = _output_factors(model, config, names, batches)
    ranks = _allocate_ranks(model, config, names, batches, lefts, progress)
    compress_block = _BlockCompressor(model, config, ranks, lefts, partners)
    if batches is not None:
        _stream(model, names, batches, compress_block, progress, "compress",
                reference=config.correct and config.scaling == "whiten")
    else:
        _layer_by_layer(model, names, compress_block)
    return compress_block.finish(batches)
