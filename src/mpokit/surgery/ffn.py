"""Find a model's FFN blocks, read them as DenseFFN, swap in routed FFNs, and put dense ones back.

Three layouts (a "site" names where the FFN lives):
  gated: a module with gate_proj/up_proj/down_proj (Llama, Mistral, Qwen2/3, Gemma MLPs);
         the routed FFN replaces that whole module.
  gpt2:  a module with c_fc/c_proj Conv1D layers (GPT2MLP); replaced whole.
  bert:  a BERT-style layer whose FFN is split over intermediate.dense (+ activation) and
         output.dense (followed by residual + LayerNorm inside output): the routed FFN sits
         at intermediate.dense and Passthrough modules take the activation's and
         output.dense's places, so the residual and LayerNorm still run.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from mpokit.layers.base import layer_modules
from mpokit.layers.ffn import BERT_SUFFIX, DenseFFN, Passthrough, restore_dense_ffn
from mpokit.surgery.replace import get_module, set_module
from mpokit.surgery.targets import _matches

__all__ = ["FFNSite", "find_ffns", "read_ffn", "install_ffn", "restore_ffn", "site_from_module_name", "ffn_act",
           "unload_routed_ffns_"]


@dataclass(frozen=True)
class FFNSite:
    name: str  # the MLP module (gated, gpt2) or the transformer layer (bert)
    kind: str

    @property
    def module_name(self) -> str:
        """Where the routed FFN module is installed."""
        return self.name + BERT_SUFFIX if self.kind == "bert" else self.name


def site_from_module_name(module_name: str, kind: str) -> FFNSite:
    if kind == "bert":
        if not module_name.endswith(BERT_SUFFIX):
            raise ValueError(f"expected a BERT routed FFN name ending in {BERT_SUFFIX!r}, got {module_name!r}")
        return FFNSite(module_name[: -len(BERT_SUFFIX)], kind)
    return FFNSite(module_name, kind)


def _kind(module: nn.Module) -> str | None:
    if all(isinstance(getattr(module, a, None), nn.Linear) for a in ("gate_proj", "up_proj", "down_proj")):
        return "gated"
    if all(type(getattr(module, a, None)).__name__ == "Conv1D" for a in ("c_fc", "c_proj")):
        return "gpt2"
    inter, out = getattr(module, "intermediate", None), getattr(module, "output", None)
    if isinstance(getattr(inter, "dense", None), nn.Linear) and isinstance(getattr(out, "dense", None), nn.Linear):
        return "bert"
    return None


def find_ffns(model: nn.Module, target_modules: str | list[str] | None = None,
              exclude_modules: str | list[str] | None = None) -> list[FFNSite]:
    """Dense FFN sites in model order; targets/excludes match site names like surgery.find_targets."""
    sites = [FFNSite(n, k) for n, m in model.named_modules() if n and (k := _kind(m))]
    if target_modules is not None:
        sites = [s for s in sites if _matches(s.name, target_modules)]
    if exclude_modules:
        sites = [s for s in sites if not _matches(s.name, exclude_modules)]
    if not sites:
        raise ValueError(f"expected at least one dense FFN (gated MLP, GPT-2 MLP or BERT layer) matching "
                         f"{target_modules!r}, got none in {type(model).__name__}")
    return sites


def ffn_act(model: nn.Module, kind: str) -> str:
    """The FFN activation's name, from the model config."""
    config = getattr(model, "config", None)
    keys = ("activation_function",) if kind == "gpt2" else ("hidden_act", "hidden_activation")
    for key in keys:
        name = getattr(config, key, None)
        if isinstance(name, str):
            return name
    raise ValueError(f"expected the model config to name the FFN activation ({' or '.join(keys)}), got none")


def read_ffn(model: nn.Module, site: FFNSite) -> DenseFFN:
    """The site's FFN weights (detached views: do not edit them in place)."""
    m = get_module(model, site.name)
    act = ffn_act(model, site.kind)
    if site.kind == "gated":
        g, u, d = m.gate_proj, m.up_proj, m.down_proj
        return DenseFFN(up=u.weight.detach(), down=d.weight.detach(), act=act, gate=g.weight.detach(),
                        up_bias=_b(u), gate_bias=_b(g), down_bias=_b(d))
    if site.kind == "gpt2":
        return DenseFFN(up=m.c_fc.weight.detach().t(), down=m.c_proj.weight.detach().t(), act=act,
                        up_bias=_b(m.c_fc), down_bias=_b(m.c_proj))
    if site.kind == "bert":
        up, down = m.intermediate.dense, m.output.dense
        return DenseFFN(up=up.weight.detach(), down=down.weight.detach(), act=act, up_bias=_b(up), down_bias=_b(down))
    raise ValueError(f"expected site kind gated/gpt2/bert, got {site.kind!r}")


def _b(module: nn.Module):
    b = getattr(module, "bias", None)
    return None if b is None else b.detach()


def install_ffn(model: nn.Module, site: FFNSite, module: nn.Module) -> None:
    """Put a routed FFN (x -> FFN(x)) at the site, in the train/eval mode of the module it replaces."""
    module.train(get_module(model, site.module_name).training)
    if site.kind == "bert":
        layer = get_module(model, site.name)
        layer.intermediate.dense = module
        layer.intermediate.intermediate_act_fn = Passthrough()
        layer.output.dense = Passthrough()
    else:
        set_module(model, site.name, module)


def restore_ffn(model: nn.Module, site: FFNSite, ffn: DenseFFN) -> None:
    """Put a dense FFN back at a site that holds a routed one (in the routed one's train/eval mode)."""
    restore_dense_ffn(model, site.module_name, site.kind, ffn)


def unload_routed_ffns_(model: nn.Module) -> int:
    """Routed FFNs back to dense through the layer protocol (undo_): MoE layers that hold a dense
    FFN's slices are merged; MoE layers with MPO experts become the same MoE with dense experts;
    upcycled MoE layers stay. Returns how many routed FFNs were undone."""
    changed = 0
    for name, m in layer_modules(model):
        if getattr(m, "site_kind", None) is not None:  # routed FFNs (never nested in one another)
            m.undo_(model, name)
            changed += model.get_submodule(name) is not m
    return changed
