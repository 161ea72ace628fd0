"""Training wrappers over Hugging Face `Trainer` (checkpoints, resume, accelerate launch)."""
from mpokit.train.data import SST2, TextWindows, read_sst2, shared_data_dir
from mpokit.train.evaluate import accuracy
from mpokit.train.params import count_trainable, head_parameters, train_only_
from mpokit.train.trainer import FitResult, fit

__all__ = ["SST2", "TextWindows", "read_sst2", "shared_data_dir", "accuracy", "count_trainable", "head_parameters",
           "train_only_", "FitResult", "fit"]
