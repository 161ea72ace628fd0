"""embed/: pooling, int8 and binary codes, the index (search, rescoring, save/load), the CLI, MiniLM."""
from __future__ import annotations

import json

import pytest
import torch

from mpokit.cli.main import main
from mpokit.embed import (EmbeddingIndex, IndexFileError, Int8Ranges, SentenceEncoder, hamming, load_encoder,
                          mean_pool, pack_signs, packed_bytes, paragraphs, recall_at_k, retrieval_pairs,
                          split_sentences, unpack_signs)
from mpokit.embed.retrieval import detokenize

WORDS = "the a cat dog sat on mat rug stocks fell market bank river boat eggs flour recipe red blue sky".split()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: k + 2 for k, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


def tiny_encoder() -> SentenceEncoder:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=32)
    return SentenceEncoder(BertModel(cfg).eval(), tiny_tokenizer(), max_length=32)


def unit(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


# ---- pooling -----------------------------------------------------------------------
def test_mean_pool_ignores_padding_and_normalises():
    enc = tiny_encoder()
    alone = enc.encode(["the cat sat"])
    batched = enc.encode(["the cat sat", "the dog sat on the mat by the river with a boat"])
    assert torch.allclose(alone[0], batched[0], atol=1e-5)
    assert torch.allclose(batched.norm(dim=1), torch.ones(2), atol=1e-6)
    # negative control: a mean that counts the padded positions gives another vector
    hidden, mask = torch.randn(1, 5, 8), torch.tensor([[1, 1, 1, 0, 0]])
    assert torch.allclose(mean_pool(hidden, mask), torch.nn.functional.normalize(hidden[:, :3].mean(1), dim=1))
    assert not torch.allclose(mean_pool(hidden, mask), torch.nn.functional.normalize(hidden.mean(1), dim=1))


def test_encode_rejects_a_bare_string():
    with pytest.raises(TypeError, match="list of texts"):
        tiny_encoder().encode("the cat")


# ---- int8 ----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["asymmetric", "symmetric"])
def test_int8_round_trip_error_is_half_a_step(mode):
    x = unit(500, 64) + 0.05  # dimensions off zero, as sentence embeddings are
    r = Int8Ranges.calibrate(x, mode)
    codes = r.quantize(x)
    assert codes.dtype == torch.int8 and codes.shape == x.shape
    err = (r.dequantize(codes) - x).abs()
    assert (err <= r.scale / 2 + 1e-6).all()  # inside the calibrated range: rounding error only
    # scores with the scale folded into the query equal scores against the dequantized vectors
    q = unit(7, 64, seed=1)
    assert torch.allclose(r.scores(q, codes), q @ r.dequantize(codes).T, atol=1e-5)
    # outside the calibrated range values are clipped to its ends
    far = torch.full((1, 64), 10.0)
    assert torch.equal(r.quantize(far), torch.full((1, 64), 127, dtype=torch.int8))


def test_asymmetric_ranges_beat_symmetric_on_offset_dimensions():
    x = unit(500, 64) * 0.2 + 0.5  # every dimension centred at 0.5
    errs = {m: (Int8Ranges.calibrate(x, m).dequantize(Int8Ranges.calibrate(x, m).quantize(x)) - x).pow(2).mean()
            for m in ("asymmetric", "symmetric")}
    assert errs["asymmetric"] < 0.5 * errs["symmetric"]


def test_int8_ranges_reject_bad_input():
    with pytest.raises(ValueError, match="int8 mode"):
        Int8Ranges.calibrate(unit(4, 8), "log")
    with pytest.raises(ValueError, match=r"shape \(N, 8\)"):
        Int8Ranges.calibrate(unit(4, 8)).quantize(unit(4, 9))


# ---- binary --------------------------------------------------------------------------
@pytest.mark.parametrize("dim, nbytes", [(384, 48), (64, 8), (50, 7)])
def test_packbits_bytes_per_vector(dim, nbytes):
    x = unit(10, dim)
    packed = pack_signs(x)
    assert packed.dtype == torch.uint8 and packed.shape == (10, nbytes) and packed_bytes(dim) == nbytes
    assert torch.equal(unpack_signs(packed, dim), torch.where(x > 0, 1.0, -1.0))
    assert EmbeddingIndex(dim, "binary").bytes_per_vector == nbytes
    assert EmbeddingIndex(dim, "int8").bytes_per_vector == dim
    assert EmbeddingIndex(dim, "float32").bytes_per_vector == 4 * dim
    ix = EmbeddingIndex(dim, "binary", rescore="int8")
    assert ix.search_bytes_per_vector == nbytes and ix.bytes_per_vector == nbytes + dim


@pytest.mark.parametrize("dim", [64, 50])  # 64-bit words and plain bytes
def test_hamming_counts_differing_signs(dim):
    a, b = unit(5, dim), unit(9, dim, seed=1)
    expected = ((a > 0).unsqueeze(1) != (b > 0).unsqueeze(0)).sum(-1)  # (5, 9)
    assert torch.equal(hamming(pack_signs(a), pack_signs(b)), expected.int())


# ---- index: search and rescoring -------------------------------------------------------
SETUPS = [("float32", "none"), ("int8", "none"), ("binary", "none"), ("binary", "int8"), ("binary", "float32")]


@pytest.mark.parametrize("storage, rescore", SETUPS)
def test_search_finds_each_stored_vector_first(storage, rescore):
    x = unit(200, 64)
    ix = EmbeddingIndex(64, storage, rescore=rescore)
    assert torch.equal(ix.add(x), torch.arange(200))
    ids, scores = ix.search(x, k=5)
    assert ids.shape == (200, 5) and scores.shape == (200, 5)
    assert torch.equal(ids[:, 0], torch.arange(200))
    assert (scores[:, :-1] >= scores[:, 1:]).all()  # best first
    one_id, one_score = ix.search(x[3], k=1)  # a single query gives flat results
    assert one_id.tolist() == [3] and one_score.shape == (1,)


def test_search_rejects_bad_queries():
    ix = EmbeddingIndex(16)
    with pytest.raises(ValueError, match="empty"):
        ix.search(unit(1, 16), 1)
    ix.add(unit(3, 16))
    with pytest.raises(ValueError, match=r"shape \(N, 16\)"):
        ix.search(unit(1, 8), 1)
    with pytest.raises(ValueError, match="k >= 1"):
        ix.search(unit(1, 16), 0)
    assert ix.search(unit(1, 16), 10)[0].shape == (1, 3)  # k beyond the index: all of it
    with pytest.raises(ValueError, match="binary storage"):
        EmbeddingIndex(16, "int8", rescore="float32")


def test_rescoring_improves_binary_recall():
    """Documents in tight groups, queries slightly moved copies of them: Hamming alone confuses the members
    of a group, rescoring its candidates with the float query separates them."""
    centres = unit(50, 64).repeat_interleave(8, dim=0)  # (400, 64): 8 documents per group
    docs = torch.nn.functional.normalize(centres + 0.2 * unit(400, 64, seed=1), dim=1)
    queries = torch.nn.functional.normalize(docs + 0.05 * unit(400, 64, seed=2), dim=1)
    truth = torch.arange(400)
    recall = {}
    for rescore in ("none", "int8", "float32"):
        ix = EmbeddingIndex(64, "binary", rescore=rescore, rescore_multiplier=8)
        ix.add(docs)
        recall[rescore] = recall_at_k(ix.search(queries, k=10)[0], truth, 1)
    exact = EmbeddingIndex(64)
    exact.add(docs)
    assert recall_at_k(exact.search(queries, k=1)[0], truth, 1) == 1.0  # the noise leaves float search exact
    assert recall["none"] < 0.95  # negative control: the bits alone lose neighbours
    assert recall["float32"] >= recall["none"] + 0.05 and recall["int8"] >= recall["none"] + 0.05
    assert recall["float32"] >= 0.99 and recall["int8"] >= 0.99
    # multiplier 1 only reorders the k Hamming candidates: recall@k cannot change
    ix = EmbeddingIndex(64, "binary", rescore="float32", rescore_multiplier=1)
    ix.add(docs)
    plain = EmbeddingIndex(64, "binary")
    plain.add(docs)
    assert recall_at_k(ix.search(queries, 10)[0], truth, 10) == recall_at_k(plain.search(queries, 10)[0], truth, 10)


# ---- index: files ------------------------------------------------------------------------
@pytest.mark.parametrize("storage, rescore", SETUPS)
def test_save_load_round_trip_is_bit_exact(tmp_path, storage, rescore):
    x = unit(50, 24)
    ix = EmbeddingIndex(24, storage, rescore=rescore, encoder={"source": "somewhere", "max_length": 9})
    if ix.uses_int8:
        ix.calibrate(unit(80, 24, seed=3), "other vectors")
    ix.add(x, [f"text {i}" for i in range(50)])
    ix.save(tmp_path / "idx")
    back = EmbeddingIndex.load(tmp_path / "idx")
    assert torch.equal(back.codes, ix.codes) and back.codes.dtype == ix.codes.dtype
    assert (back.rescore_codes is None) == (ix.rescore_codes is None)
    if ix.rescore_codes is not None:
        assert torch.equal(back.rescore_codes, ix.rescore_codes)
    if ix.ranges is not None:
        assert torch.equal(back.ranges.scale, ix.ranges.scale) and torch.equal(back.ranges.offset, ix.ranges.offset)
    assert back.texts == ix.texts and back.meta() == ix.meta() and back.encoder == ix.encoder
    q = unit(6, 24, seed=4)
    for a, b in zip(back.search(q, 5), ix.search(q, 5)):
        assert torch.equal(a, b)


def test_save_refuses_an_existing_folder_and_load_rejects_foreign_ones(tmp_path):
    ix = EmbeddingIndex(8)
    ix.add(unit(3, 8))
    ix.save(tmp_path / "idx")
    with pytest.raises(FileExistsError, match="--overwrite"):
        ix.save(tmp_path / "idx")
    ix.add(unit(2, 8, seed=1))
    ix.save(tmp_path / "idx", overwrite=True)
    assert len(EmbeddingIndex.load(tmp_path / "idx")) == 5
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an mpokit embedding index"):
        ix.save(tmp_path / "other", overwrite=True)  # never replaces a folder that is not an index
    with pytest.raises(FileNotFoundError, match="mpokit-index.json"):
        EmbeddingIndex.load(tmp_path / "other")
    (tmp_path / "idx" / "vectors.safetensors").write_bytes(b"junk")
    with pytest.raises(IndexFileError, match="cannot read"):
        EmbeddingIndex.load(tmp_path / "idx")


# ---- the WikiText retrieval task ------------------------------------------------------
WIKI = """ 
 = Title = 
 
 Alpha is a thing . It has 3 @.@ 5 parts . It was made in the year @-@ long project . 
 Two sentences only . Not enough . 
 
 = = Section = = 
 
 Beta works well ! People like it , mostly . Why ? Nobody knows . 
"""


def test_wikitext_paragraphs_and_pairs():
    assert paragraphs(WIKI)[1] == "Two sentences only . Not enough ."
    assert len(paragraphs(WIKI)) == 3
    assert split_sentences(paragraphs(WIKI)[2]) == ["Beta works well !", "People like it , mostly .", "Why ?",
                                                    "Nobody knows ."]
    pairs = retrieval_pairs(WIKI)
    assert [p.query for p in pairs] == ["Alpha is a thing.", "Beta works well!"]
    assert pairs[0].document == "It has 3.5 parts. It was made in the year-long project."
    assert pairs[1].sentences == 4 and len(retrieval_pairs(WIKI, limit=1)) == 1
    assert detokenize("( a , b ) it 's") == "(a, b) it's"


def test_recall_at_k():
    ids = torch.tensor([[2, 0, 1], [0, 1, 2]])
    assert recall_at_k(ids, torch.tensor([2, 2]), 1) == 0.5
    assert recall_at_k(ids, torch.tensor([2, 2]), 3) == 1.0
    with pytest.raises(ValueError):
        recall_at_k(ids, torch.tensor([2, 2]), 4)


# ---- CLI -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cli_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed_cli")
    torch.manual_seed(0)
    enc = tiny_encoder()
    enc.model.save_pretrained(root / "enc")
    enc.tokenizer.save_pretrained(root / "enc")
    (root / "docs.txt").write_text("the cat sat on the mat\n\nstocks fell market bank\nthe recipe eggs flour\n")
    return root


def test_load_encoder_reads_a_folder(cli_dir):
    enc = load_encoder(str(cli_dir / "enc"))
    assert enc.dim == 32 and enc.max_length == 32 and enc.source == str((cli_dir / "enc").resolve())
    torch.manual_seed(0)
    same = tiny_encoder()  # the fixture's seed: the weights saved in the folder
    texts = ["the cat sat", "stocks fell on the market"]
    assert torch.allclose(enc.encode(texts), same.encode(texts), atol=1e-6)
    other = tiny_encoder()  # negative control: other weights, other vectors
    assert not torch.allclose(enc.encode(texts), other.encode(texts), atol=1e-3)


def test_cli_index_search_info(cli_dir, capsys):
    out = cli_dir / "idx"
    assert main(["embed", "index", str(cli_dir / "docs.txt"), "--out", str(out), "--model", str(cli_dir / "enc"),
                 "--storage", "binary", "--rescore", "int8", "--no-progress", "--json", str(cli_dir / "ix.json")]) == 0
    summary = json.loads((cli_dir / "ix.json").read_text())
    assert summary["count"] == 3 and summary["bytes_per_vector"] == 4 + 32 and summary["storage"] == "binary"
    capsys.readouterr()
    assert main(["embed", "search", str(out), "the cat sat on the mat", "-k", "2", "--json", "-"]) == 0
    res = json.loads(capsys.readouterr().out)
    hits = res["queries"][0]["results"]
    assert len(hits) == 2 and hits[0]["id"] == 0 and hits[0]["text"] == "the cat sat on the mat"
    assert main(["embed", "info", str(out)]) == 0
    assert "binary + int8 rescoring" in capsys.readouterr().out


def test_cli_int8_calibrated_on_another_file(cli_dir):
    (cli_dir / "calib.txt").write_text("red blue sky\nthe river boat\nthe bank\n")
    out = cli_dir / "idx8"
    assert main(["embed", "index", str(cli_dir / "docs.txt"), "--out", str(out), "--model", str(cli_dir / "enc"),
                 "--storage", "int8", "--calibration", str(cli_dir / "calib.txt"), "--no-progress"]) == 0
    ix = EmbeddingIndex.load(out)
    assert ix.calibration.startswith("lines of") and ix.int8_mode == "symmetric" and ix.codes.dtype == torch.int8
    enc = load_encoder(str(cli_dir / "enc"))
    expected = Int8Ranges.calibrate(enc.encode(["red blue sky", "the river boat", "the bank"]), "symmetric")
    assert torch.allclose(ix.ranges.scale, expected.scale, atol=1e-7)


@pytest.mark.parametrize("argv, message", [
    (["index", "{root}/missing.txt", "--out", "{root}/o1"], "missing text file"),
    (["index", "{root}/empty.txt", "--out", "{root}/o2"], "non-blank line"),
    (["index", "{root}/docs.txt", "--out", "{root}/o3", "--storage", "int8", "--rescore", "int8"], "--storage binary"),
    (["index", "{root}/docs.txt", "--out", "{root}/o4", "--model", "{root}/no_such_model"], "no such model folder"),
    (["search", "{root}/enc", "query"], "mpokit-index.json"),
    (["search", "{root}/nothing", "query"], "no such folder"),
    (["index", "{root}/docs.txt", "--out", "{root}/o5", "--storage", "int4"], "invalid choice"),
    (["search", "{root}/idx", "query", "-k", "0"], "-k"),
])
def test_cli_bad_input_exits_2(cli_dir, capsys, argv, message):
    (cli_dir / "empty.txt").write_text("\n  \n")
    with pytest.raises(SystemExit) as e:
        main(["embed", *(a.format(root=cli_dir) for a in argv)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mpokit: error:") and message in err and len(err.splitlines()) == 1


def test_cli_refuses_an_existing_out(cli_dir, capsys):
    out = cli_dir / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as e:
        main(["embed", "index", str(cli_dir / "docs.txt"), "--out", str(out), "--model", str(cli_dir / "enc")])
    assert e.value.code == 2 and (out / "keep.txt").read_text() == "mine"
    first = cli_dir / "again"
    argv = ["embed", "index", str(cli_dir / "docs.txt"), "--out", str(first), "--model", str(cli_dir / "enc"),
            "--no-progress"]
    assert main(argv) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--storage", "int8"]) == 0
    assert EmbeddingIndex.load(first).storage == "int8"


# ---- the real encoder ---------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("storage, rescore", SETUPS)
def test_minilm_ranks_a_paraphrase_above_an_unrelated_sentence(storage, rescore):
    enc = _minilm()
    docs = ["A man is playing a guitar on stage.", "The stock market fell sharply today.",
            "Heavy rain flooded the streets of the city."]
    ix = EmbeddingIndex(enc.dim, storage, rescore=rescore)
    ix.encode(enc, docs)
    ids, scores = ix.search_texts(enc, ["Someone performs music with a guitar.", "Shares dropped steeply."], k=3)
    assert ids[:, 0].tolist() == [0, 1]
    if storage == "float32":  # cosines of the known model: a clear margin
        assert scores[0, 0] > scores[0, 1] + 0.2


_CACHE: dict = {}


def _minilm():
    if "enc" not in _CACHE:
        _CACHE["enc"] = load_encoder()
    return _CACHE["enc"]
