from mpokit.methods.moefication.config import MoEficationConfig, MoEficationRefitConfig
from mpokit.methods.moefication.transform import moe_layers, moefy_, set_top_k_

__all__ = ["MoEficationConfig", "MoEficationRefitConfig", "moefy_", "set_top_k_", "moe_layers"]
