from mpokit.io.atomic import atomic_dir, write_json, write_text
from mpokit.io.checkpoint import CheckpointError, is_checkpoint, load_compressed, register_layer, save_compressed
from mpokit.io.models import LoadedModel, MissingModelError, load_model

__all__ = ["atomic_dir", "write_json", "write_text", "CheckpointError", "is_checkpoint", "load_compressed",
           "register_layer", "save_compressed", "LoadedModel", "MissingModelError", "load_model"]
