"""A plain model back out of one that FSDP2 sharded during training, so that the usual checkpoint writer can save it.

Trainer under FSDP2 (`fully_shard`) leaves every parameter a DTensor holding this rank's shard (the root's stay
unsharded views of FSDP's buffers after a forward), swaps each wrapped module's class for an `FSDP<Name>` subclass
that no loader knows, and hooks forward and state_dict (which would swap the shards back in). Undone here in that
order: reshard, gather each parameter whole (`full_tensor`, a collective, so every rank calls it in the same
order) as a plain CPU parameter, give each module its own class back, drop FSDP's hooks. torch has no public
"unshard for good"; `get_model_state_dict` gives whole tensors but no model to save them with. Rank 0 then writes
the checkpoint.
"""
from __future__ import annotations

from torch import nn


def _is_fsdp_hook(hook) -> bool:
    fn = getattr(hook, "hook", hook)  # load_state_dict hooks come wrapped
    fn = getattr(fn, "func", fn)  # functools.partial
    return getattr(fn, "__module__", "").startswith("torch.distributed.fsdp")


def gather_sharded_(model: nn.Module) -> bool:
    """Make an FSDP2-sharded model plain again, in place, with whole CPU parameters; True if it was sharded."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    wrapped = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in wrapped:
        module.reshard()  # every parameter back to its DTensor shard
    sharded = [(module, name, p) for module in model.modules() for name, p in module.named_parameters(recurse=False)
               if isinstance(p, DTensor)]
    for module, name, p in sharded:
        module._parameters[name] = nn.Parameter(p.full_tensor().detach().cpu(), requires_grad=p.requires_grad)
    for module in wrapped:
        module.__class__ = next(base for base in type(module).__bases__ if base is not FSDPModule)
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks, module._state_dict_pre_hooks,
                      module._state_dict_hooks, module._load_state_dict_pre_hooks,
                      module._load_state_dict_post_hooks):
            for key in [k for k, h in hooks.items() if _is_fsdp_hook(h)]:
                del hooks[key]
    return bool(sharded)


def is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
