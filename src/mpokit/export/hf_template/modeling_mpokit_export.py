"""Written by `mpokit export --format hf` (copied verbatim): the model classes of this folder, without mpokit.

`AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` finds the classes below through
config.json's `auto_map`. MpokitExported<X> is the stock transformers.<X> (LlamaForCausalLM, LlamaConfig,
...) whose modules named in `config.mpokit_layers` are replaced, when it is built, by the layers of
mpokit_export_layers.py, under the tensor names of mpokit's own checkpoints: MPO cores, packed integer
codes with 16-bit scales, experts and routers. The math follows mpokit's float paths step for step
(float32 logits agree to rounding); mpokit's packed int4/int8 CPU kernels, used there for bfloat16
inputs only, are not reproduced: quantized weights are dequantized on every call. These three files
import only torch and transformers.
"""
import transformers
from torch import nn

from .mpokit_export_layers import LAYERS

PREFIX = "MpokitExported"


# ---- the model: the stock class, with the listed modules replaced ---------------------------------
def _set_module(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def install_layers_(model, config):
    """Put the layers of config.mpokit_layers in place; ties as mpokit keeps them."""
    layers = getattr(config, "mpokit_layers", None) or {}
    unknown = sorted({s["type"] for s in layers.values()} - set(LAYERS))
    if unknown:
        raise ValueError(f"expected layer types this file rebuilds ({', '.join(LAYERS)}), got {unknown}")
    for name, spec in layers.items():
        _set_module(model, name, LAYERS[spec["type"]](spec))
    for name, spec in layers.items():
        if spec.get("tied_to"):  # one module shared: cores or packed table stored once, for both layers
            layer, source = model.get_submodule(name), model.get_submodule(spec["tied_to"])
            attr = "cores" if isinstance(getattr(source, "cores", None), nn.ParameterList) else "qweight"
            setattr(layer, attr, getattr(source, attr))
    # parameters stored once for several names: the stock ties that still name parameters, and mpokit's
    params = dict(model.named_parameters(remove_duplicate=False))
    stock = getattr(model, "all_tied_weights_keys", None) or {}
    ties = {t: s for t, s in stock.items() if t in params and s in params}
    ties.update(getattr(config, "mpokit_tied_parameters", None) or {})
    model._tied_weights_keys = model.all_tied_weights_keys = ties


def _exported(name, bases, namespace):
    cls = type(name, bases, {"__module__": __name__, "__qualname__": name, **namespace})
    globals()[name] = cls
    return cls


def exported_config(base):
    """transformers config class `base` under model type "mpokit_export_<type>" (plain transformers
    refuses the folder: without trust_remote_code it never loads random weights in place of cores)."""
    return globals().get(PREFIX + base.__name__) or _exported(PREFIX + base.__name__, (base,),
                                                              {"model_type": "mpokit_export_" + base.model_type})


def exported_model(base):
    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        install_layers_(self, config)

    return _exported(PREFIX + base.__name__, (base,), {"__init__": __init__,
                                                       "config_class": exported_config(base.config_class)})


def __getattr__(name):  # module attribute MpokitExported<X>: built from transformers.<X> on first use
    base = getattr(transformers, name[len(PREFIX):], None) if name.startswith(PREFIX) else None
    if isinstance(base, type) and issubclass(base, transformers.PretrainedConfig):
        return exported_config(base)
    if isinstance(base, type) and issubclass(base, transformers.PreTrainedModel):
        return globals().get(name) or exported_model(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
