"""Issue 18: recovery that generalizes.

`mpokit finetune` never reports a figure on its training text (the tail of --data is held out, and an
out-of-domain text is scored too); `recover` distils from the uncompressed model by default, the plain
LM loss stays available; the built-in "mix" corpus interleaves its three sources.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mpokit.data import load_corpus, read_sst2, shared_data_dir

WIKI = shared_data_dir() / "wikitext-2" / "valid.txt"


def _tokenizer():
    from transformers import AutoTokenizer

    from mpokit.io.models import minilm_path

    return AutoTokenizer.from_pretrained(minilm_path())


def _teacher_folder(tmp_path, tok, init: float = 0.2):
    """A tiny Llama with peaked next-token distributions (large init) saved with a tokenizer, and its
    compressed checkpoint that records it as its source, as `mpokit compress` does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from mpokit.io.checkpoint import save_compressed
    from mpokit.io.models import load_model
    from mpokit.methods.base import compress_
    from mpokit.methods.mpo import MPOConfig

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=True, initializer_range=init))
    dense = tmp_path / "dense"
    model.save_pretrained(dense)
    tok.save_pretrained(dense)
    loaded = load_model(str(dense))
    compress_(loaded.model, MPOConfig(target_modules=["up_proj", "down_proj"], budget=0.5), progress=False)
    ckpt = save_compressed(loaded.model, tmp_path / "ckpt", tokenizer=loaded.tokenizer, extra={"source": str(dense)})
    return dense, ckpt


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recover")
    tok = _tokenizer()
    dense, ckpt = _teacher_folder(tmp, tok)
    text = tmp / "t.txt"
    text.write_text(WIKI.read_text(encoding="utf-8")[:24000], encoding="utf-8")
    return {"tmp": tmp, "tok": tok, "dense": dense, "ckpt": ckpt, "text": text}


def _options(setup, out, **kw):
    from mpokit.train.recipes import FinetuneOptions

    base = dict(model=str(setup["ckpt"]), method="recover", task="lm", data=str(setup["text"]), max_steps=2,
                out=str(out), batch_size=2, seq_len=32, eval_tokens=256, context=64)
    return FinetuneOptions(**{**base, **kw})


def _contains(haystack: list[int], needle: list[int]) -> bool:
    n = len(needle)
    return any(haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))


def _overlapping_windows(windows: torch.Tensor, ids: list[int]) -> int:
    return sum(_contains(ids, w.tolist()) for w in windows)


def test_finetune_never_scores_its_training_text(setup, monkeypatch, tmp_path, capsys):
    """The held-out tail is what perplexity reads; no training window occurs in it (checked on token ids)."""
    import importlib

    import mpokit.train.trainer as trainer_module
    from mpokit.cli.main import main

    ppl_module = importlib.import_module("mpokit.eval.perplexity")  # the package's attribute is the function

    seen = {"train": None, "texts": []}
    real_fit, real_ppl = trainer_module.fit, ppl_module.perplexity

    def fit(model, dataset, *a, **kw):
        seen["train"] = dataset
        return real_fit(model, dataset, *a, **kw)

    def perplexity(model, tokenizer, text, *a, **kw):
        seen["texts"].append(text)
        return real_ppl(model, tokenizer, text, *a, **kw)

    monkeypatch.setattr(trainer_module, "fit", fit)
    monkeypatch.setattr(ppl_module, "perplexity", perplexity)
    ood = tmp_path / "ood.txt"
    ood.write_text(load_corpus().text[:6000], encoding="utf-8")
    out_json = tmp_path / "r.json"
    rc = main(["finetune", str(setup["ckpt"]), "--method", "recover", "--recover-loss", "lm", "--task", "lm",
               "--data", str(setup["text"]), "--ood-data", str(ood), "--max-steps", "2", "--batch-size", "2",
               "--seq-len", "32", "--tokens", "256", "--context", "64", "--out", str(tmp_path / "o"),
               "--json", str(out_json)])
    assert rc == 0
    assert "evaluated on a held-out 10% of --data" in capsys.readouterr().out
    r = json.loads(out_json.read_text())
    data = setup["text"].read_text(encoding="utf-8")
    cut = r["eval"]["from_char"]
    assert r["eval"]["held_out"] is True and r["perplexity"] == r["eval"]["perplexity"]
    assert 0.09 < r["eval"]["fraction"] < 0.11 and 0.85 * len(data) < cut < 0.95 * len(data)
    assert seen["texts"] == [data[cut:], ood.read_text(encoding="utf-8")]  # held-out tail, then ood: nothing else
    [entry] = r["ood"]  # --ood-data replaces the default texts
    assert entry["text"] == str(ood) and math.isfinite(entry["perplexity"]) and "out-of-domain" in entry["note"]
    tok, windows = setup["tok"], seen["train"].windows  # (n, 32)
    train_ids = tok(data[:cut], return_tensors="pt").input_ids[0]
    assert torch.equal(windows.reshape(-1), train_ids[:windows.numel()])  # training read only the text before cut
    held_ids = tok(data[cut:], return_tensors="pt").input_ids[0].tolist()
    assert _overlapping_windows(windows, held_ids) == 0
    # negative control: the check finds the windows in the training text itself (the old evaluation)
    assert _overlapping_windows(windows[:5], tok(data, return_tensors="pt").input_ids[0].tolist()) == 5


def test_eval_data_equal_to_data_is_refused(setup, tmp_path):
    from mpokit.train.recipes import finetune

    with pytest.raises(ValueError, match="--eval-data other than --data"):
        finetune(_options(setup, tmp_path / "o", eval_data=str(setup["text"])))
    with pytest.raises(ValueError, match="--ood-data other than --data"):
        finetune(_options(setup, tmp_path / "o", ood_data=str(setup["text"])))
    with pytest.raises(ValueError, match="--ood-data other than --data"):  # any one of several
        finetune(_options(setup, tmp_path / "o", ood_data=["licenses", str(setup["text"])]))


def test_sst2_reports_dev_accuracy_never_train(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from mpokit.train.recipes import FinetuneOptions, finetune

    tok = _tokenizer()
    folder = tmp_path / "bert"
    BertForSequenceClassification(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                                             num_labels=2)).save_pretrained(folder)
    tok.save_pretrained(folder)
    sst2 = shared_data_dir() / "sst2"
    common = dict(model=str(folder), method="full", task="sst2", data=str(sst2), max_steps=1, batch_size=4,
                  seq_len=24, train_limit=8, eval_limit=8)
    r = finetune(FinetuneOptions(out=str(tmp_path / "o"), **common))
    assert r["eval"]["text"] == str(sst2 / "dev.tsv") and r["eval"]["accuracy"] == r["accuracy"] and r["eval_rows"] == 8
    with pytest.raises(ValueError, match="other than the training file"):
        finetune(FinetuneOptions(out=str(tmp_path / "o2"), eval_data=str(sst2 / "train.tsv"), **common))


def _kl_on(student, teacher, tok, text: str, seq_len: int = 32) -> float:
    from mpokit.methods.kd.loss import kd_loss

    ids = tok(text, return_tensors="pt").input_ids[0]
    n = len(ids) // seq_len
    x = ids[: n * seq_len].reshape(n, seq_len)  # (n, seq_len)
    with torch.no_grad():
        return kd_loss(student(x).logits, teacher(x).logits, 1.0).item()


def test_kd_recover_moves_the_student_toward_the_teacher(setup, tmp_path, monkeypatch):
    import mpokit.train.trainer as trainer_module
    from mpokit.io.checkpoint import load_compressed
    from mpokit.io.models import load_model
    from mpokit.methods.mpop import RecoverConfig
    from mpokit.train.recipes import finetune

    results, real_fit = [], trainer_module.fit
    monkeypatch.setattr(trainer_module, "fit", lambda *a, **kw: results.append(real_fit(*a, **kw)) or results[-1])
    # alpha 1: the training loss is the KL alone, so its fall is the distillation's (the default 0.75 adds LM loss)
    r = finetune(_options(setup, tmp_path / "o", max_steps=12, batch_size=4, lr=1e-2, method=RecoverConfig(alpha=1.0)))
    assert r["recover_loss"] == "kd" and r["teacher"] == str(setup["dense"]) and r["config"]["loss"] == "kd"
    losses = results[0].losses
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    held_out = setup["text"].read_text(encoding="utf-8")[r["eval"]["from_char"]:]
    teacher, tok = load_model(str(setup["dense"])).model, setup["tok"]
    before = _kl_on(load_compressed(setup["ckpt"]), teacher, tok, held_out)
    after = _kl_on(load_compressed(r["saved"]), teacher, tok, held_out)
    assert before > 0.05 and after < 0.8 * before, (before, after)
    # negative control: the same run on the LM loss does not bring the student closer to the teacher
    lm = finetune(_options(setup, tmp_path / "lm", max_steps=12, batch_size=4, lr=1e-2, method=RecoverConfig(loss="lm")))
    assert _kl_on(load_compressed(lm["saved"]), teacher, tok, held_out) > after


def test_lm_loss_recipe_needs_no_teacher(setup, tmp_path):
    """loss="lm" trains on the model's own loss; a checkpoint without a recorded source works for it only."""
    from mpokit.io.checkpoint import load_compressed, save_compressed
    from mpokit.methods.mpop import RecoverConfig
    from mpokit.train.recipes import finetune

    bare = save_compressed(load_compressed(setup["ckpt"]), tmp_path / "bare", tokenizer=setup["tok"])  # no source
    r = finetune(_options(setup, tmp_path / "o", model=str(bare), method=RecoverConfig(loss="lm"), lr=1e-3))
    assert r["recover_loss"] == "lm" and r["teacher"] is None and r["global_step"] == 2
    assert r["train_loss"] > 5  # next-token cross-entropy over a 30k vocabulary, not a KL near 0
    with pytest.raises(ValueError, match="records its source model"):
        finetune(_options(setup, tmp_path / "o2", model=str(bare)))
    with pytest.raises(ValueError, match="only with --recover-loss kd"):
        RecoverConfig(loss="lm", hidden_weight=1.0)


@pytest.mark.parametrize("trainable", ["aux", "lora"])
def test_parameter_efficient_recovery(setup, tmp_path, trainable):
    from mpokit.layers.mpo import MPOLinear
    from mpokit.io.checkpoint import load_compressed
    from mpokit.methods.mpop import RecoverConfig, auxiliary_parameters
    from mpokit.train.recipes import finetune

    if trainable == "lora":
        pytest.importorskip("peft")
    r = finetune(_options(setup, tmp_path / "o", method=RecoverConfig(trainable=trainable, rank=2)))
    student = load_compressed(setup["ckpt"])
    saved = load_compressed(r["saved"])
    assert r["teacher"] == str(setup["dense"]) and r["lr"] == (1e-3 if trainable == "lora" else 1e-4)
    if trainable == "aux":
        assert r["trainable_params"] == sum(p.numel() for p in auxiliary_parameters(student))
    else:  # adapters (rank 2: A and B) on every MPO layer, merged back into the cores
        layers = [m for m in student.modules() if isinstance(m, MPOLinear)]
        assert r["trainable_params"] == sum(2 * (m.in_features + m.out_features) for m in layers)
        assert all(type(m).__name__ == "MPOLinear" for n, m in saved.named_modules() if n.endswith("up_proj"))


def test_hidden_state_term_adds_to_the_loss_and_trains():
    from conftest import tiny_llama
    from mpokit.methods.kd.loss import hidden_mse, make_kd_loss

    teacher, student = tiny_llama(), tiny_llama()  # two random inits: hidden states differ
    x = {"input_ids": torch.randint(0, 128, (2, 16))}
    x["labels"] = x["input_ids"]
    plain, _ = make_kd_loss(teacher, alpha=1.0, temperature=1.0)(student, x)
    both, out = make_kd_loss(teacher, alpha=1.0, temperature=1.0, hidden_weight=1.0)(student, x)
    gap = hidden_mse(out.hidden_states, teacher(**x, output_hidden_states=True).hidden_states)
    assert gap > 0.1 and both.item() == pytest.approx(plain.item() + gap.item(), rel=1e-5)
    both.backward()
    assert student.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    same = hidden_mse(out.hidden_states, out.hidden_states)
    assert same.item() == 0  # negative control: identical states give nothing


def test_recover_on_sst2_asks_for_a_trained_teacher():
    from conftest import tiny_llama
    from mpokit.methods.finetune import TrainContext
    from mpokit.methods.mpop import RecoverConfig, decompose_

    model = tiny_llama()
    decompose_(model, target_modules=["up_proj"])
    ctx = TrainContext(task="sst2", train=None, collator=None, batch_size=1, max_steps=1, head=[],
                       load_teacher=lambda path: None, fit=lambda *a, **kw: None)
    with pytest.raises(ValueError, match="no trained head"):
        RecoverConfig().prepare(model, ctx)


def _source_of(sub: str, sources: dict[str, str]) -> str | None:
    return next((k for k, t in sources.items() if sub in t), None)


def test_mix_interleaves_all_three_sources():
    from mpokit.data.corpus import MIX_CHUNK, pydoc_first_half

    mix = load_corpus("mix").text
    docs = load_corpus().text
    sources = {"wiki": WIKI.read_text(encoding="utf-8"), "docs": docs,
               "sst2": "\n".join(s for _, s in read_sst2(shared_data_dir() / "sst2" / "train.tsv"))}
    span = 3 * MIX_CHUNK + 64  # three chunks, whatever the whole-word cuts
    # every stretch of `span` characters (the first one is the prefix) holds all three sources
    for start in [0, *range(len(mix) // 7, len(mix) - span, len(mix) // 7), len(mix) - span]:
        window = mix[start:start + span]
        found = {_source_of(window[k:k + 40], sources) for k in range(0, span - 40, 40)}
        assert {"wiki", "docs", "sst2"} <= found, (start, found)
    # negative control: a stretch of one source alone is told apart
    assert {_source_of(sources["wiki"][k:k + 40], sources) for k in range(0, span, 40)} == {"wiki"}
    # the out-of-domain text of finetune (the docs' first half) is never in the mix
    first = pydoc_first_half().text
    assert first.startswith(docs[:1000]) and all(first[k:k + 200] not in mix for k in range(0, len(first) - 200, 2_000))


def test_calibration_mix_is_the_mix_and_compression_defaults_to_it_here():
    from mpokit.data import Calibration

    mix = Calibration.mix(tokens=256)
    assert mix.text == load_corpus("mix").text and mix.name.startswith("mix") and mix.tokens == 256
    assert Calibration.from_file("mix").text == mix.text
    assert Calibration.from_file(None).text == mix.text  # the shared data folder is here: the mix is the default
    assert Calibration.from_file("pydoc").name.startswith("pydoc_data.topics")  # the old default, by name


def test_default_ood_texts_are_pydoc_first_half_and_the_licences(setup, tmp_path, monkeypatch):
    """Without --ood-data the run scores both default texts, each named; a machine without the licence folder
    scores the pydoc text alone and says so by naming only it."""
    from mpokit.data import corpus
    from mpokit.train.recipes import finetune

    folder = tmp_path / "licenses"
    folder.mkdir()
    for name in corpus.LICENSE_FILES:
        (folder / name).write_text(f"{name}: permission is hereby granted, free of charge, to any person. " * 40,
                                   encoding="utf-8")
    monkeypatch.setattr(corpus, "LICENSE_DIR", folder)
    r = finetune(_options(setup, tmp_path / "o"))
    names = [e["text"] for e in r["ood"]]
    assert names == [corpus.pydoc_first_half().name, corpus.licenses_corpus().name]
    assert str(folder) in names[1] and all(math.isfinite(e["perplexity"]) for e in r["ood"])
    monkeypatch.setattr(corpus, "LICENSE_DIR", tmp_path / "absent")
    r = finetune(_options(setup, tmp_path / "o2"))
    assert [e["text"] for e in r["ood"]] == [corpus.pydoc_first_half().name]
    # training on a default text drops it from the defaults (never an OOD figure on training text)
    trained_on_licences = tmp_path / "train.txt"
    trained_on_licences.write_text(setup["text"].read_text(encoding="utf-8") + corpus.licenses_corpus(folder).text)
    monkeypatch.setattr(corpus, "LICENSE_DIR", folder)
    r = finetune(_options(setup, tmp_path / "o3", data=str(trained_on_licences)))
    assert [e["text"] for e in r["ood"]] == [corpus.pydoc_first_half().name]


def test_licenses_corpus_refuses_a_partial_folder(tmp_path):
    from mpokit.data.corpus import LICENSE_FILES, licenses_corpus

    (tmp_path / LICENSE_FILES[0]).write_text("text", encoding="utf-8")
    with pytest.raises(FileNotFoundError, match="missing licence texts"):
        licenses_corpus(tmp_path)


def test_vim_manual_corpus_reads_the_newest_manual_and_refuses_a_folder_without_one(tmp_path):
    from mpokit.data.corpus import vim_manual_corpus

    for version, words in (("vim81", "old"), ("vim90", "new")):
        doc = tmp_path / version / "doc"
        doc.mkdir(parents=True)
        for n in ("01", "02"):
            (doc / f"usr_{n}.txt").write_text(f"{words} chapter {n}", encoding="utf-8")
        (doc / "options.txt").write_text("the reference manual, not the user manual", encoding="utf-8")
    c = vim_manual_corpus(tmp_path)
    assert c.text == "new chapter 01\n\nnew chapter 02" and "vim90" in c.name and c.name.startswith("vim-manual")
    with pytest.raises(FileNotFoundError, match="missing the Vim user manual"):
        vim_manual_corpus(tmp_path / "absent")
    if Path("/usr/share/vim").is_dir() and list(Path("/usr/share/vim").glob("vim*/doc/usr_01.txt")):
        assert load_corpus("vim-manual").name.startswith("vim-manual")


def test_data_defaults_to_the_mix_for_lm_and_the_shared_sst2_folder(tmp_path, monkeypatch):
    from mpokit.train.recipes import FinetuneOptions

    monkeypatch.setenv("MPOKIT_DATA", str(tmp_path))
    lm = FinetuneOptions(model=None, method="recover", task="lm", data=None, max_steps=1, out=str(tmp_path / "o"))
    sst2 = FinetuneOptions(model=None, method="full", task="sst2", data=None, max_steps=1, out=str(tmp_path / "o"))
    named = FinetuneOptions(model=None, method="recover", task="lm", data="t.txt", max_steps=1, out=str(tmp_path))
    assert (lm.data, sst2.data, named.data) == ("mix", str(tmp_path / "sst2"), "t.txt")


def test_max_steps_may_be_left_to_the_clock_but_not_for_a_phased_method():
    """--max-minutes alone: the clock ends training (max_steps becomes an upper bound nobody reaches); neither
    is refused, and so is MPOP dimension squeezing (it splits its steps over several runs)."""
    from mpokit.methods.mpop.config import MPOPConfig
    from mpokit.train.recipes import CLOCK_ONLY_STEPS, FinetuneOptions

    base = dict(model=None, method="recover", task="lm", data="mix", out="/tmp/unused")
    assert FinetuneOptions(**base, max_steps=None, max_minutes=15).max_steps == CLOCK_ONLY_STEPS
    assert FinetuneOptions(**base, max_steps=48, max_minutes=15).max_steps == 48  # negative control
    with pytest.raises(ValueError, match="expected --max-steps or --max-minutes"):
        FinetuneOptions(**base, max_steps=None)
    with pytest.raises(ValueError, match="splits its steps"):
        FinetuneOptions(**{**base, "method": MPOPConfig(squeeze_bond=4)}, max_steps=None, max_minutes=15)
    assert not MPOPConfig().trains_in_phases  # without squeezing MPOP is one run
