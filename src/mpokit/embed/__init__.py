"""Sentence embeddings for retrieval and zero-shot classification, stored as float32, int8 or bits.

encoder: MiniLM (or any encoder) -> mean-pooled, L2-normalised vectors; codecs: per-dimension
int8 with calibrated ranges, packed sign bits; index: a flat index with search, binary +
rescoring, save/load; retrieval: the offline WikiText-2 retrieval task and recall@k.
"""
from mpokit.embed.codecs import INT8_MODES, Int8Ranges, hamming, pack_signs, packed_bytes, unpack_signs
from mpokit.embed.encoder import DEFAULT_ENCODER, SentenceEncoder, load_encoder, mean_pool
from mpokit.embed.index import INDEX_MARKER, RESCORES, STORAGES, EmbeddingIndex, IndexFileError
from mpokit.embed.retrieval import Pair, paragraphs, recall_at_k, retrieval_pairs, split_sentences, wikitext_path

__all__ = ["INT8_MODES", "Int8Ranges", "hamming", "pack_signs", "packed_bytes", "unpack_signs", "DEFAULT_ENCODER",
           "SentenceEncoder", "load_encoder", "mean_pool", "INDEX_MARKER", "RESCORES", "STORAGES", "EmbeddingIndex",
           "IndexFileError", "Pair", "paragraphs", "recall_at_k", "retrieval_pairs", "split_sentences",
           "wikitext_path"]
