from mpokit.methods.mpoe.config import MPOEConfig
from mpokit.methods.mpoe.transform import moe_aux_loss, mpoe_upcycle_, routed_layers

__all__ = ["MPOEConfig", "mpoe_upcycle_", "moe_aux_loss", "routed_layers"]
