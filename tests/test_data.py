"""mpokit.data: one data-folder rule, one SST-2 reader, one Calibration value that every calibrated method reads."""
from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from test_cli import tiny_tokenizer
from test_faults_cli import words_text

from mpokit import Calibration, compress_
from mpokit.calibration.stats import resolve_calibration
from mpokit.data import read_sst2, shared_data_dir
from mpokit.methods import AwareConfig, QuantConfig


def test_one_data_dir_rule_honours_mpokit_data(monkeypatch, tmp_path):
    from mpokit.eval.abilities import default_data_dir
    from mpokit.train import shared_data_dir as train_data_dir

    monkeypatch.setenv("MPOKIT_DATA", str(tmp_path))
    assert shared_data_dir() == tmp_path
    assert train_data_dir() == tmp_path and default_data_dir() == tmp_path  # the same rule, not copies
    monkeypatch.delenv("MPOKIT_DATA")
    assert shared_data_dir() != tmp_path
    assert (shared_data_dir() / "sst2" / "dev.tsv").is_file()  # ../shared/data beside this checkout


def test_read_sst2_order_limit_and_missing_file(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text("label\tsentence\n1\ta great film\n0\tan awful film\nx\tnot a row\n1\tgood\n")
    assert read_sst2(path) == [(1, "a great film"), (0, "an awful film"), (1, "good")]  # (label, sentence)
    assert read_sst2(path, limit=2) == [(1, "a great film"), (0, "an awful film")]
    with pytest.raises(FileNotFoundError, match="missing SST-2 file"):
        read_sst2(tmp_path / "nope.tsv")
    path.write_text("label\tsentence\n")
    with pytest.raises(ValueError, match="got none"):
        read_sst2(path)


def test_calibration_from_file_and_from_text_give_the_same_batches(tmp_path):
    tok, text = tiny_tokenizer(), words_text(300)
    path = tmp_path / "calib.txt"
    path.write_text(text)
    from_file = Calibration.from_file(path)
    assert from_file.name == str(path) and from_file.text == text
    a = resolve_calibration(Calibration(text=text), tok, 256, 64, "a test")
    b = resolve_calibration(from_file, tok, 256, 64, "a test")
    assert len(a) == 4 and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    other = resolve_calibration(Calibration(text=words_text(300, seed=2)), tok, 256, 64, "a test")
    assert not torch.equal(a[0], other[0])  # negative control: the text is what is read
    sized = resolve_calibration(Calibration(text=text, tokens=128, context=32), tok, 256, 64, "a test")
    assert [x.shape for x in sized] == [(1, 32)] * 4  # a Calibration's own sizes win over the config's
    with pytest.raises(FileNotFoundError, match="missing text file"):
        Calibration.from_file(tmp_path / "nope.txt")


def test_default_calibration_is_the_mix_where_its_sources_are_else_pydoc(monkeypatch, tmp_path):
    """No calibration text: the mix when the data folder holds WikiText-2 valid and SST-2 train, else the
    pydoc corpus; resolve_calibration reads the same default, and evaluation's default stays pydoc."""
    from mpokit.data import load_corpus
    from mpokit.data.corpus import MIX, PYDOC_NAME, _mix_text, default_calibration_corpus

    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "valid.txt").write_text(words_text(3000), encoding="utf-8")
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.tsv").write_text("label\tsentence\n" + "1\ta fine film indeed\n" * 400)
    monkeypatch.setenv("MPOKIT_DATA", str(tmp_path))
    _mix_text.cache_clear()
    mixed = default_calibration_corpus()
    assert mixed.name.startswith(f"{MIX}:") and "a fine film indeed" in mixed.text
    assert Calibration.from_file(None).name == mixed.name
    tok = tiny_tokenizer()
    assert torch.equal(resolve_calibration(None, tok, 128, 64, "a test")[0],
                       resolve_calibration(Calibration(text=mixed.text), tok, 128, 64, "a test")[0])
    assert load_corpus().name == PYDOC_NAME == load_corpus("pydoc").name  # evaluation never defaults to the mix
    assert Calibration.from_file("pydoc").text == load_corpus().text  # the old default, by name
    (tmp_path / "sst2" / "train.tsv").unlink()  # one source missing: the pydoc corpus, named
    assert default_calibration_corpus().name == PYDOC_NAME == Calibration.from_file(None).name
    _mix_text.cache_clear()


def test_calibration_checks_its_fields():
    with pytest.raises(ValueError, match="got both"):
        Calibration(text="a b", batches=[torch.zeros(1, 4, dtype=torch.long)])
    with pytest.raises(ValueError, match="tokens to be an integer >= 2"):
        Calibration(tokens=1)


def _compressed(config, **kwargs) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = tiny_llama()
    compress_(model, config, progress=False, **kwargs)
    return model.state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("config", [
    AwareConfig(budget=0.6, calibration_tokens=256, calibration_context=64, fisher_tokens=128),
    QuantConfig(algorithm="gptq", bits=3, group_size=32, calibration_tokens=256, calibration_context=32),
], ids=["aware", "gptq"])
def test_calibration_and_calibration_text_give_identical_weights(config):
    tok, text = tiny_tokenizer(), words_text(400)
    old = _compressed(config, tokenizer=tok, calibration_text=text)
    new = _compressed(config, tokenizer=tok, calibration=Calibration(text=text))
    assert _same(old, new)
    other = _compressed(config, tokenizer=tok, calibration=Calibration(text=words_text(400, seed=2)))
    assert not _same(old, other)  # negative control: the calibration text changes the weights


def test_calibration_batches_match_the_batches_keyword():
    config = AwareConfig(budget=0.6, fisher_tokens=64)
    batches = [torch.randint(0, 128, (1, 32)) for _ in range(4)]
    assert _same(_compressed(config, batches=batches), _compressed(config, calibration=Calibration(batches=batches)))


def test_calibration_with_an_older_keyword_is_an_error():
    tok, text = tiny_tokenizer(), words_text(100)
    with pytest.raises(ValueError, match="expected calibration= or the older calibration_text=, got both"):
        compress_(tiny_llama(), AwareConfig(), tokenizer=tok, calibration=Calibration(text=text),
                  calibration_text=text, progress=False)
    with pytest.raises(ValueError, match="older batches=, got both"):
        compress_(tiny_llama(), QuantConfig(algorithm="gptq"), calibration=Calibration(text=text),
                  batches=[torch.randint(0, 128, (1, 32))], progress=False)
    with pytest.raises(TypeError, match="Calibration"):
        compress_(tiny_llama(), AwareConfig(), tokenizer=tok, calibration=text, progress=False)
