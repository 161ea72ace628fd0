from mpokit.methods.share.config import ShareConfig
from mpokit.methods.share.transform import plan_bond, share_compress_, weight_types

__all__ = ["ShareConfig", "share_compress_", "weight_types", "plan_bond"]
