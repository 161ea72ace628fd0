from mpokit.methods.dejavu.config import DejaVuConfig
from mpokit.methods.dejavu.transform import refit_down_, sparsify_ffns_, sparsify_site

__all__ = ["DejaVuConfig", "sparsify_ffns_", "sparsify_site", "refit_down_"]
