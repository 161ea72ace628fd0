from mpokit.methods.moefication.config import MoEficationConfig
from mpokit.methods.moefication.transform import moe_layers, moefy, set_top_k_

__all__ = ["MoEficationConfig", "moefy", "set_top_k_", "moe_layers"]
