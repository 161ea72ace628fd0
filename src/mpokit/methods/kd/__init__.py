"""KD: plain knowledge distillation (the baseline OPDF is compared with; recovery's default loss)."""
from mpokit.methods.kd.config import KDConfig
from mpokit.methods.kd.loss import hidden_mse, kd_loss, make_kd_loss

__all__ = ["KDConfig", "hidden_mse", "kd_loss", "make_kd_loss"]
