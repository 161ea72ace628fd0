"""Emergent-ability probes at small scale (the COLING 2024 quantization study), auto-scored.

- in-context learning: k-shot SST-2 sentiment, scored by comparing the next-token
  log-probabilities of " positive" and " negative" (no generation, no parsing);
- chain-of-thought arithmetic: synthetic two-step word problems with known answers,
  generated in code from a seed; few-shot worked examples, greedy decoding, the number after
  "The answer is" (else the last number) must equal the answer;
- instruction following: verifiable instructions (word limits, case, start/end phrases,
  keywords, quoting, bullet lists) checked by code, IFEval-style strict accuracy.
Sizes default small so the three run on a CPU in minutes; every result states its n.
"""
from __future__ import annotations

import contextlib
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mpokit.data import read_sst2, shared_data_dir

__all__ = ["AbilityResult", "default_data_dir", "icl_sst2", "make_arithmetic_problems", "cot_arithmetic",
           "make_instructions", "check_instruction", "instruction_following", "evaluate_abilities", "extract_answer",
           "dequantized_once"]


@dataclass
class AbilityResult:
    name: str
    score: float  # accuracy in [0, 1]
    n: int
    chance: float  # score of a trivial responder
    seconds: float
    settings: dict = field(default_factory=dict)
    examples: list = field(default_factory=list, repr=False)  # a few (prompt tail, output, correct) for reading

    def to_dict(self) -> dict:
        return asdict(self)


default_data_dir = shared_data_dir  # the one rule (MPOKIT_DATA first), under the name this module always had


def _chat(tokenizer, turns: list[tuple[str, str]]) -> str:
    """Prompt text for (role, content) turns, through the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        msgs = [{"role": r, "content": c} for r, c in turns]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    text = "".join(f"{'Question' if r == 'user' else 'Answer'}: {c}\n\n" for r, c in turns)
    return text + "Answer:"


@torch.no_grad()
def _generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy continuations, batched with left padding."""
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side, tokenizer.padding_side = getattr(tokenizer, "padding_side", "right"), "left"
    outs = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            outs += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return outs


# ---- in-context learning -----------------------------------------------------------------
@torch.no_grad()
def icl_sst2(model, tokenizer, k: int = 4, n: int = 100, seed: int = 0, data_dir: str | Path | None = None) -> AbilityResult:
    """k-shot SST-2 accuracy on the first n dev sentences (demonstrations: balanced, from train)."""
    start = time.perf_counter()
    data = Path(data_dir) if data_dir else default_data_dir()
    train, dev = read_sst2(data / "sst2" / "train.tsv"), read_sst2(data / "sst2" / "dev.tsv")[:n]  # (label, text)
    rng = random.Random(seed)
    pos, neg = [r for r in train if r[0] == 1], [r for r in train if r[0] == 0]
    verbal = {0: " negative", 1: " positive"}
    label_ids = [tokenizer(verbal[c], add_special_tokens=False)["input_ids"][0] for c in (0, 1)]
    device = next(model.parameters()).device
    correct, examples = 0, []
    for label, text in dev:
        demos = rng.sample(pos, k // 2 + k % 2) + rng.sample(neg, k // 2)
        rng.shuffle(demos)
        prompt = "".join(f"Review: {t}\nSentiment:{verbal[y]}\n\n" for y, t in demos) + f"Review: {text}\nSentiment:"
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
        logits = model(input_ids=ids).logits[0, -1]  # (V,)
        pred = int(logits[label_ids[1]] > logits[label_ids[0]])
        correct += pred == label
        if len(examples) < 3:
            examples.append({"text": text, "label": label, "pred": pred})
    labels = [y for y, _ in dev]
    chance = max(labels.count(0), labels.count(1)) / max(len(labels), 1)
    return AbilityResult("icl_sst2", correct / max(len(dev), 1), len(dev), chance, time.perf_counter() - start,
                         {"k": k, "seed": seed}, examples)


# ---- chain-of-thought arithmetic ------------------------------------------------------------
_NAMES = ["Tom", "Anna", "Ravi", "Mei", "Lucas", "Sara", "Omar", "Lena"]
_ITEMS = ["apples", "books", "marbles", "stickers", "pencils", "cookies", "stamps", "coins"]


def make_arithmetic_problems(n: int, seed: int = 0) -> list[dict]:
    """Two-step word problems with their worked solutions and integer answers."""
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        a = rng.randint(3, 20)
        kind = rng.choice(["buy_give", "packs", "give_buy"])
        if kind == "buy_give":
            b, c = rng.randint(2, 15), rng.randint(1, 10)
            c = min(c, a + b - 1)
            q = f"{name} has {a} {item}. {name} buys {b} more and then gives {c} to a friend. How many {item} does {name} have now?"
            steps, ans = f"{name} starts with {a}. After buying {b}: {a} + {b} = {a + b}. After giving {c}: {a + b} - {c} = {a + b - c}.", a + b - c
        elif kind == "packs":
            b, c = rng.randint(2, 6), rng.randint(2, 9)
            q = f"{name} has {a} {item} and buys {b} packs with {c} {item} in each pack. How many {item} does {name} have now?"
            steps, ans = f"The packs hold {b} x {c} = {b * c}. Total: {a} + {b * c} = {a + b * c}.", a + b * c
        else:
            c, b = rng.randint(1, a - 1), rng.randint(2, 15)
            q = f"{name} has {a} {item}, gives away {c}, and then finds {b} more. How many {item} does {name} have now?"
            steps, ans = f"After giving away {c}: {a} - {c} = {a - c}. After finding {b}: {a - c} + {b} = {a - c + b}.", a - c + b
        problems.append({"question": q, "solution": f"{steps} The answer is {ans}.", "answer": ans})
    return problems


def extract_answer(text: str) -> int | None:
    """The number after 'answer is', else the last number in the text."""
    m = re.search(r"answer is\s*\$?(-?\d+)", text, flags=re.IGNORECASE)
    if m:
        return int(m.group(1))
    nums = re.findall(r"-?\d+", text)
    return int(nums[-1]) if nums else None


def cot_arithmetic(model, tokenizer, n: int = 30, shots: int = 2, seed: int = 0, max_new_tokens: int = 72,
                   batch_size: int = 8) -> AbilityResult:
    """Exact-match accuracy on n synthetic problems with `shots` worked examples (chain of thought)."""
    start = time.perf_counter()
    demos = make_arithmetic_problems(shots, seed=seed + 10_000)
    problems = make_arithmetic_problems(n, seed=seed)
    hint = " Think step by step, then finish with 'The answer is N.'"
    turns_demo = [t for d in demos for t in (("user", d["question"] + hint), ("assistant", d["solution"]))]
    prompts = [_chat(tokenizer, turns_demo + [("user", p["question"] + hint)]) for p in problems]
    outs = _generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    preds = [extract_answer(o.split("\n\n")[0] if "answer is" not in o.lower() else o) for o in outs]
    correct = [p == q["answer"] for p, q in zip(preds, problems)]
    examples = [{"question": q["question"], "output": o, "answer": q["answer"], "correct": c}
                for q, o, c in list(zip(problems, outs, correct))[:3]]
    return AbilityResult("cot_arithmetic", sum(correct) / max(n, 1), n, 0.0, time.perf_counter() - start,
                         {"shots": shots, "seed": seed, "max_new_tokens": max_new_tokens}, examples)


# ---- instruction following -------------------------------------------------------------------
_TOPICS = ["the ocean", "a rainy day", "your favourite food", "learning to cook", "the moon", "a city park",
           "winter mornings", "a good book", "trains", "a garden"]
# (instruction text, checker name, argument)
_INSTRUCTIONS = [
    ("Answer in fewer than {k} words.", "max_words", [20, 30, 40]),
    ("Write your whole answer in lowercase letters only.", "lowercase", [None]),
    ("Write your whole answer in capital letters only.", "uppercase", [None]),
    ("Start your answer with the word '{k}'.", "starts_with", ["Yes", "Sure", "Today"]),
    ("End your answer with the exact phrase '{k}'.", "ends_with", ["The end.", "Thank you."]),
    ("Include the word '{k}' in your answer.", "contains", ["blue", "quiet", "happy"]),
    ("Wrap your entire answer in double quotation marks.", "quoted", [None]),
    ("Answer with exactly {k} bullet points, each starting with '- '.", "bullets", [2, 3]),
    ("Do not use any commas in your answer.", "no_commas", [None]),
]


TRIVIAL_RESPONSE = "ok"  # passes the word-limit, lowercase and no-comma checks: the "chance" of this probe


def make_instructions(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        text, check, args = _INSTRUCTIONS[i % len(_INSTRUCTIONS)]
        arg = rng.choice(args)
        topic = rng.choice(_TOPICS)
        out.append({"prompt": f"Write a few sentences about {topic}. {text.format(k=arg)}", "check": check, "arg": arg})
    return out


def check_instruction(response: str, check: str, arg=None) -> bool:
    """Whether `response` follows the verifiable instruction (strict, on the stripped text)."""
    r = response.strip()
    if not r:
        return False
    if check == "max_words":
        return len(r.split()) < int(arg)
    if check == "lowercase":
        return r == r.lower() and any(c.isalpha() for c in r)
    if check == "uppercase":
        return r == r.upper() and any(c.isalpha() for c in r)
    if check == "starts_with":
        return re.match(rf"\W*{re.escape(arg)}\b", r, flags=re.IGNORECASE) is not None
    if check == "ends_with":
        return r.endswith(arg)
    if check == "contains":
        return re.search(rf"\b{re.escape(arg)}\b", r, flags=re.IGNORECASE) is not None
    if check == "quoted":
        return len(r) >= 2 and r[0] in "\"“" and r[-1] in "\"”"
    if check == "bullets":
        return len(re.findall(r"^\s*[-*] ", r, flags=re.MULTILINE)) == int(arg)
    if check == "no_commas":
        return "," not in r
    raise ValueError(f"expected a known instruction check, got {check!r}")


def instruction_following(model, tokenizer, n: int = 27, seed: int = 0, max_new_tokens: int = 64,
                          batch_size: int = 8) -> AbilityResult:
    """Strict accuracy over n verifiable instructions (cycling through the instruction types).

    A response cut off by max_new_tokens is scored as it stands, so end-of-answer checks
    count against long-winded models; the setting is reported with the score. `chance` is the
    score of the trivial response "ok" (it satisfies 3 of the 9 instruction types).
    """
    start = time.perf_counter()
    items = make_instructions(n, seed)
    outs = _generate(model, tokenizer, [_chat(tokenizer, [("user", it["prompt"])]) for it in items],
                     max_new_tokens, batch_size)
    ok = [check_instruction(o, it["check"], it["arg"]) for o, it in zip(outs, items)]
    by_type: dict[str, list[bool]] = {}
    for it, good in zip(items, ok):
        by_type.setdefault(it["check"], []).append(good)
    examples = [{"prompt": it["prompt"], "output": o, "followed": g} for it, o, g in list(zip(items, outs, ok))[:3]]
    trivial = sum(check_instruction(TRIVIAL_RESPONSE, it["check"], it["arg"]) for it in items) / max(n, 1)
    return AbilityResult("instruction_following", sum(ok) / max(n, 1), n, trivial, time.perf_counter() - start,
                         {"seed": seed, "max_new_tokens": max_new_tokens,
                          "by_type": {k: sum(v) / len(v) for k, v in by_type.items()}}, examples)


@contextlib.contextmanager
def dequantized_once(model):
    """Let quantized layers keep their dequantized weight during the probes: the same numbers as
    dequantizing on every decoding step, without re-unpacking the codes once per token."""
    layers = [m for m in model.modules() if hasattr(m, "cache_weight")]
    saved = [m.cache_weight for m in layers]
    for m in layers:
        m.cache_weight = True
    try:
        yield model
    finally:
        for m, flag in zip(layers, saved):
            m.cache_weight = flag
            m._cached = None


def evaluate_abilities(model, tokenizer, icl_n: int = 100, icl_k: int = 4, cot_n: int = 30, if_n: int = 27,
                       seed: int = 0, data_dir: str | Path | None = None) -> dict[str, AbilityResult]:
    """The three probes with one seed; sizes small by default (say them next to the scores)."""
    model.eval()
    with dequantized_once(model), torch.no_grad():
        return {
            "icl_sst2": icl_sst2(model, tokenizer, k=icl_k, n=icl_n, seed=seed, data_dir=data_dir),
            "cot_arithmetic": cot_arithmetic(model, tokenizer, n=cot_n, seed=seed),
            "instruction_following": instruction_following(model, tokenizer, n=if_n, seed=seed),
        }
