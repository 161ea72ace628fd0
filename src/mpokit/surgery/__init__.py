from mpokit.surgery.replace import get_module, set_module, shared_outside, tied_groups
from mpokit.surgery.targets import DEFAULT_TARGETS, default_targets, find_targets, weight_matrix
from mpokit.surgery.unload import to_dense_module, unload_

__all__ = ["get_module", "set_module", "tied_groups", "shared_outside", "DEFAULT_TARGETS", "default_targets",
           "find_targets", "weight_matrix", "to_dense_module", "unload_"]
