from mpokit.layers.base import LAYERS, MpokitLayer, layer_modules, register_layer
from mpokit.layers.mpo import FORWARD_MODES, MPOEmbedding, MPOLinear, MPOModule, make_layout

# Every module whose layers a checkpoint may hold, imported so that their classes are in LAYERS.
from mpokit.layers import ffn, moe, mpo_conv, mpo_rnn, mpoe, quant, quant_embedding, quant_mpo, sparse_ffn  # noqa: E402,F401  isort: skip

__all__ = ["FORWARD_MODES", "LAYERS", "MPOEmbedding", "MPOLinear", "MPOModule", "MpokitLayer", "layer_modules",
           "make_layout", "register_layer"]
