"""eval/abilities (generators, checkers, scoring); the lm-eval adapter's tests are in test_lm_eval.py."""
from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import mpokit.eval.abilities as ab
from conftest import tiny_llama

WORDS = ["[PAD]", "[UNK]", "[EOS]", "Review:", "Sentiment:", "positive", "negative", "good", "bad", "film", "a",
         "the", "is", "was", "great", "awful", "Question:", "Answer:", "The", "answer", "5", "7", "12", "."]


def word_tokenizer():
    """A word-level tokenizer built in memory (no files, no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def sst2_dir(tmp_path, rows=((1, "a great film"), (0, "an awful film"), (1, "good"), (0, "bad film"))):
    d = tmp_path / "sst2"
    d.mkdir()
    lines = "\n".join(f"{y}\t{t}" for y, t in rows)
    (d / "train.tsv").write_text("label\tsentence\n" + lines + "\n" + lines + "\n")
    (d / "dev.tsv").write_text("label\tcontent\n" + lines + "\n")
    return tmp_path


class AlwaysSays(nn.Module):
    """A stand-in LM whose next-token logits always favour one token id."""

    def __init__(self, token_id: int, vocab: int = len(WORDS)):
        super().__init__()
        self.token_id, self.vocab = token_id, vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., self.token_id] = 1.0
        return type("Out", (), {"logits": logits})()


def test_icl_scoring_with_controls(tmp_path):
    tok, data = word_tokenizer(), sst2_dir(tmp_path)
    pos_id = tok(" positive", add_special_tokens=False)["input_ids"][0]
    neg_id = tok(" negative", add_special_tokens=False)["input_ids"][0]
    assert pos_id != neg_id
    assert ab.icl_sst2(AlwaysSays(pos_id), tok, k=2, n=4, data_dir=data).score == 0.5
    assert ab.icl_sst2(AlwaysSays(neg_id), tok, k=2, n=4, data_dir=data).score == 0.5
    res = ab.icl_sst2(tiny_llama_for(tok), tok, k=2, n=4, data_dir=data)
    assert res.n == 4 and 0 <= res.score <= 1 and res.chance == 0.5


def tiny_llama_for(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="SST-2"):
        ab.icl_sst2(AlwaysSays(0), word_tokenizer(), data_dir=tmp_path)


def test_arithmetic_problems_are_correct_and_seeded():
    probs = ab.make_arithmetic_problems(60, seed=3)
    assert probs == ab.make_arithmetic_problems(60, seed=3) and probs != ab.make_arithmetic_problems(60, seed=4)
    for p in probs:
        for lhs, rhs in re.findall(r"(\d+ [-+x] \d+) = (\d+)", p["solution"]):  # every worked step checks out
            assert eval(lhs.replace("x", "*")) == int(rhs)
        assert p["answer"] >= 0 and ab.extract_answer(p["solution"]) == p["answer"]


def test_extract_answer():
    assert ab.extract_answer("3 + 4 = 7. The answer is 7.") == 7
    assert ab.extract_answer("so 12 apples") == 12
    assert ab.extract_answer("no idea") is None


def test_cot_scoring(monkeypatch):
    probs = ab.make_arithmetic_problems(6, seed=0)
    tok = word_tokenizer()
    monkeypatch.setattr(ab, "_generate", lambda m, t, prompts, *a, **k: [p["solution"] for p in probs])
    assert ab.cot_arithmetic(None, tok, n=6, seed=0).score == 1.0
    monkeypatch.setattr(ab, "_generate", lambda m, t, prompts, *a, **k: [f"The answer is {p['answer'] + 1}." for p in probs])
    assert ab.cot_arithmetic(None, tok, n=6, seed=0).score == 0.0


CASES = [  # (check, arg, followed, not followed)
    ("max_words", 5, "Short and sweet.", "This answer has far too many words in it."),
    ("lowercase", None, "all lower case here", "Not all lower"),
    ("uppercase", None, "ALL CAPS!", "Mostly CAPS but not"),
    ("starts_with", "Sure", "Sure, the moon is bright.", "The moon, sure."),
    ("ends_with", "The end.", "A story. The end.", "The end. A story."),
    ("contains", "blue", "The sky is blue today.", "The sky is bluish."),
    ("quoted", None, '"Quoted text."', 'Quoted "text".'),
    ("bullets", 2, "- one\n- two", "- one\n- two\n- three"),
    ("no_commas", None, "No commas here.", "Commas, here."),
]


@pytest.mark.parametrize("check,arg,good,bad", CASES)
def test_instruction_checks(check, arg, good, bad):
    assert ab.check_instruction(good, check, arg)
    assert not ab.check_instruction(bad, check, arg)
    assert not ab.check_instruction("   ", check, arg)


def test_every_instruction_type_is_generated_and_checkable():
    items = ab.make_instructions(18, seed=1)
    assert {it["check"] for it in items} == {c for c, *_ in CASES}
    for it in items:
        ab.check_instruction("x", it["check"], it["arg"])  # raises on an unknown check


def test_instruction_scoring(monkeypatch):
    items = ab.make_instructions(9, seed=0)
    good = {c: g for c, _, g, _ in CASES}
    tok = word_tokenizer()

    def follow(m, t, prompts, *a, **k):  # answers that follow each instruction with its own argument
        outs = []
        for it in items:
            check, arg = it["check"], it["arg"]
            by_arg = {"starts_with": lambda: f"{arg} indeed.", "ends_with": lambda: f"Fine. {arg}",
                      "contains": lambda: f"It is {arg}.", "bullets": lambda: "\n".join(["- x"] * int(arg)),
                      "max_words": lambda: "Two words."}
            outs.append(by_arg[check]() if check in by_arg else good[check])
        return outs

    monkeypatch.setattr(ab, "_generate", follow)
    res = ab.instruction_following(None, tok, n=9)
    assert res.score == 1.0 and res.chance == pytest.approx(3 / 9)
    monkeypatch.setattr(ab, "_generate", lambda m, t, prompts, *a, **k: ["" for _ in prompts])
    assert ab.instruction_following(None, tok, n=9).score == 0.0


def test_generation_path_runs_on_a_tiny_model():
    tok = word_tokenizer()
    model = tiny_llama_for(tok)
    res = ab.cot_arithmetic(model, tok, n=3, max_new_tokens=4)
    assert res.n == 3 and 0 <= res.score <= 1 and len(res.examples) == 3
    assert tok.padding_side == "right"  # restored after left-padded batches


def test_dequantized_once_restores_flags():
    from mpokit import compress_
    from mpokit.layers.quant import QuantLinear
    from mpokit.methods import QuantConfig

    model = tiny_llama()
    compress_(model, QuantConfig(bits=4, group_size=32), progress=False)
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        ref = model(ids).logits
        with ab.dequantized_once(model):
            assert all(m.cache_weight for m in model.modules() if isinstance(m, QuantLinear))
            assert torch.equal(model(ids).logits, ref)
    assert not any(m.cache_weight for m in model.modules() if isinstance(m, QuantLinear))
