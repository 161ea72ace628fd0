"""KD: plain knowledge distillation (the baseline OPDF is compared with)."""
from mpokit.methods.kd.config import KDConfig
from mpokit.methods.kd.loss import kd_loss, make_kd_loss

__all__ = ["KDConfig", "kd_loss", "make_kd_loss"]
