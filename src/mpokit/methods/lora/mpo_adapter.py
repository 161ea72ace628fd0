"""LoRA on top of MPO layers through PEFT's custom-module mechanism (`LoraConfig._register_custom_module`).

PEFT only wraps nn.Linear-like layers it knows. `MPOLoraLinear` reuses PEFT's own LoRA Linear (A, B,
scaling, dropout, adapter bookkeeping, forward = base(x) + B(A(x)) * scaling) and overrides only what
touches the base weight: an MPOLinear's `.weight` is rebuilt from its cores, so merging adds the
adapter to the *cores*: the MPO of W + dW is the direct sum of the MPO of W and an exact TT-SVD of dW
(bonds grow; the result equals the unmerged layer up to float error).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from mpokit.layers.mpo import MPOLinear
from mpokit.ops.tt import pad_matrix, tt_svd

__all__ = ["tt_add", "add_to_cores_", "lora_config_for_mpo", "MPOLoraLinear", "mpo_lora_targets"]

# Relative TT-SVD cutoff for the adapter delta: keeps its nonzero spectrum, drops float noise.
DELTA_CUTOFF = 1e-7


def tt_add(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[torch.Tensor]:
    """Cores of the MPO sum A + B (same local dims): block-diagonal cores, bonds r_a + r_b."""
    if len(a) != len(b):
        raise ValueError(f"expected MPOs with equal core counts, got {len(a)} and {len(b)}")
    if len(a) == 1:
        return [a[0] + b[0]]
    out = []
    for k, (x, y) in enumerate(zip(a, b)):  # x: (ra0, o, i, ra1), y: (rb0, o, i, rb1)
        if x.shape[1:3] != y.shape[1:3]:
            raise ValueError(f"expected equal local dims at core {k}, got {tuple(x.shape)} and {tuple(y.shape)}")
        if k == 0:
            out.append(torch.cat([x, y], dim=3))  # (1, o, i, ra1 + rb1)
        elif k == len(a) - 1:
            out.append(torch.cat([x, y], dim=0))  # (ra0 + rb0, o, i, 1)
        else:
            z = x.new_zeros(x.shape[0] + y.shape[0], x.shape[1], x.shape[2], x.shape[3] + y.shape[3])
            z[: x.shape[0], :, :, : x.shape[3]] = x
            z[x.shape[0]:, :, :, x.shape[3]:] = y
            out.append(z)
    return out


@torch.no_grad()
def add_to_cores_(layer: MPOLinear, delta: torch.Tensor) -> None:
    """layer.weight += delta (out, in), exactly, by appending an MPO of delta to the cores."""
    padded = pad_matrix(delta.to(torch.float64), math.prod(layer.out_dims), math.prod(layer.in_dims))
    delta_cores, _ = tt_svd(padded, layer.out_dims, layer.in_dims, cutoff=DELTA_CUTOFF)
    current = [c.detach().to(torch.float64) for c in layer.cores]
    grad = [c.requires_grad for c in layer.cores]
    layer.set_cores(tt_add(current, delta_cores))  # set_cores casts back to the layer dtype
    for c in layer.cores:
        c.requires_grad_(all(grad))


def _lora_linear_cls():
    from peft.tuners.lora.layer import Linear as LoraLinear

    class MPOLoraLinear(LoraLinear):
        """PEFT LoRA adapter around an MPOLinear: cores frozen by PEFT, A/B train; merge writes into cores."""

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            from peft.tuners.tuners_utils import check_adapters_to_merge

            base = self.get_base_layer()
            for name in check_adapters_to_merge(self, adapter_names):
                if name not in self.lora_A.keys():
                    continue
                if name in self.lora_variant:
                    raise ValueError(f"expected plain LoRA on MPO layers, got variant {type(self.lora_variant[name])}")
                delta = self.get_delta_weight(name)  # (out, in)
                if safe_merge and not torch.isfinite(delta).all():
                    raise ValueError(f"NaNs in adapter {name!r}; not merged")
                add_to_cores_(base, delta)
                if self.lora_bias[name]:
                    base.bias.data += self.lora_B[name].bias * self.scaling[name]
                self.merged_adapters.append(name)

        def unmerge(self) -> None:
            raise NotImplementedError("merging into MPO cores grows the bonds; unmerge is not supported")

        def __repr__(self) -> str:
            return "lora.mpo." + nn.Module.__repr__(self)

    return MPOLoraLinear


def __getattr__(name):  # lazy: PEFT is optional
    if name == "MPOLoraLinear":
        return _lora_linear_cls()
    raise AttributeError(name)


def mpo_lora_targets(model: nn.Module) -> list[str]:
    """Leaf names (e.g. q_proj, down_proj) of the model's MPOLinear layers, for LoraConfig.target_modules."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, MPOLinear)})


def lora_config_for_mpo(config):
    """Register MPOLinear -> MPOLoraLinear on a peft LoraConfig (returns it)."""
    config._register_custom_module({MPOLinear: _lora_linear_cls()})
    return config
