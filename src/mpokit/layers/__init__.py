from mpokit.layers.mpo import FORWARD_MODES, MPOEmbedding, MPOLinear, MPOModule, make_layout

__all__ = ["FORWARD_MODES", "MPOEmbedding", "MPOLinear", "MPOModule", "make_layout"]
