"""OPDF: distillation into an over-parameterized (OPF) student with a tensor constraint loss."""
from mpokit.methods.opdf.config import OPDFConfig
from mpokit.methods.opdf.core import expand_teacher_like_, kd_loss, make_distill_loss, tensor_constraint_loss

__all__ = ["OPDFConfig", "expand_teacher_like_", "kd_loss", "make_distill_loss", "tensor_constraint_loss"]
