"""The Python files `mpokit export --format hf` copies verbatim into every folder it writes (all but this one).

They import torch and transformers only, never mpokit: the folder must load where mpokit is not installed.
modeling_mpokit_export.py holds the model and config classes config.json's auto_map names; it builds
mpokit_export_layers.py's modules, which compute with mpokit_export_ops.py's tensor math.
"""
