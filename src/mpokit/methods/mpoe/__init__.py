from mpokit.methods.mpoe.config import MPOEConfig
from mpokit.methods.mpoe.transform import moe_aux_loss, mpoe_upcycle, routed_layers

__all__ = ["MPOEConfig", "mpoe_upcycle", "moe_aux_loss", "routed_layers"]
