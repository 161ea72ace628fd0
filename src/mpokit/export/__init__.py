"""Export mpokit models to other runtimes' formats. GGUF (llama.cpp, transformers `gguf_file=`) for now.

FORMATS maps a format name to its exporter `(model_or_dir, out_path, options, **kw) -> report dict`;
adding a format adds one module here and one entry.
"""
from mpokit.export.gguf import GGUFOptions, export_gguf

FORMATS = {"gguf": export_gguf}

__all__ = ["FORMATS", "GGUFOptions", "export_gguf"]
