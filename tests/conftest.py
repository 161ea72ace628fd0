"""Tiny models built in memory from configs, shared by the unit tests."""
from __future__ import annotations

import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

# Tiny models gain nothing from threads, and OpenMP barriers thrash on a busy 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class ByteTokenizer:
    """Byte-level stand-in tokenizer for the tiny 128-token vocabularies (ids = bytes mod 128)."""

    def __call__(self, text, return_tensors=None):
        ids = torch.tensor([b % 128 for b in text.encode()])

        class Encoded:
            input_ids = ids[None]
        return Encoded()


def tiny_llama(tie: bool = True, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie,
                      max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=96, n_positions=64, n_embd=48, n_layer=2, n_head=4)).eval()


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=96, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=96, max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture
def bert():
    return tiny_bert()


_HIDE_MPOKIT = textwrap.dedent("""
    import sys
    try:
        import mpokit
    except ImportError:
        pass
    else:
        raise SystemExit("mpokit is importable here: " + mpokit.__file__)
""")


def run_without_mpokit(script: str, args: list[str], cwd: Path, timeout: int, **env) -> None:
    """Run `script` in a Python that cannot import mpokit: -S skips site-packages' .pth files (among them
    mpokit's editable-install path) and PYTHONPATH gives the packages back without it. The script starts by
    checking that mpokit is not importable; a non-zero exit fails the test with the script's stderr."""
    paths = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    env = {"PYTHONPATH": ":".join(paths), "PATH": "/usr/bin:/bin", "HOME": str(cwd), **env}
    done = subprocess.run([sys.executable, "-S", "-c", _HIDE_MPOKIT + textwrap.dedent(script), *map(str, args)],
                          env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
