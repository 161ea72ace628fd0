"""Data for calibration, evaluation and training: corpora, their tokenization, SST-2, the data folder
(below eval and methods)."""
from mpokit.data.calibration import Calibration, as_calibration
from mpokit.data.corpus import Corpus, load_corpus, tokenize_prefix
from mpokit.data.mps import CompressedSet, MPSDataset, compress_dataset, read_array
from mpokit.data.paths import shared_data_dir
from mpokit.data.sst2 import read_sst2

__all__ = ["Calibration", "as_calibration", "Corpus", "load_corpus", "tokenize_prefix", "shared_data_dir",
           "read_sst2", "CompressedSet", "MPSDataset", "compress_dataset", "read_array"]
