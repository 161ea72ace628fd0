"""Re-export: choosing what trains lives in surgery/params.py (methods use it; methods may not import train)."""
from mpokit.surgery.params import count_trainable, head_parameters, train_only_

__all__ = ["train_only_", "count_trainable", "head_parameters"]
