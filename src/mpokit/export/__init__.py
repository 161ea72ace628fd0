"""Export mpokit models to other runtimes' formats: GGUF (llama.cpp, transformers `gguf_file=`),
compressed-tensors Hugging Face folders (plain transformers with the compressed-tensors package) and
self-contained transformers folders ("hf": mpokit's layers in a modeling file, trust_remote_code=True).

FORMATS maps a format name to its exporter `(model_or_dir, out_path, options, **kw) -> report dict`;
adding a format adds one module here and one entry.
"""
from mpokit.export.compressed_tensors import CTOptions, export_compressed_tensors
from mpokit.export.gguf import GGUFOptions, export_gguf
from mpokit.export.hf import HFOptions, export_hf

FORMATS = {"gguf": export_gguf, "compressed-tensors": export_compressed_tensors, "hf": export_hf}

__all__ = ["FORMATS", "GGUFOptions", "export_gguf", "CTOptions", "export_compressed_tensors", "HFOptions", "export_hf"]
