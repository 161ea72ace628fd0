"""Text corpora: a file, a Hugging Face dataset, the offline default, the built-in mix; and their token ids.

Every calibrated method and every perplexity figure reads its text here, so the default
corpus and the tokenization rule are chosen in one place.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

__all__ = ["Corpus", "load_corpus", "tokenize_prefix", "mix_corpus", "pydoc_first_half", "licenses_corpus",
           "vim_manual_corpus", "default_ood_corpora", "default_calibration_corpus", "MIX", "MIX_CHUNK", "PYDOC",
           "PYDOC_NAME", "LICENSES", "VIM_MANUAL"]

MIX = "mix"  # the name load_corpus / --data / --calibration give the built-in mix
MIX_CHUNK = 1024  # characters per chunk of the mix: about one 256-token training window
PYDOC_NAME = "pydoc_data.topics (offline default, ships with Python)"
PYDOC = "pydoc"  # the name load_corpus / --calibration / --text give the offline pydoc corpus
LICENSES = "licenses"  # the name load_corpus / --ood-data / --text give the licence texts (licenses_corpus)
# Debian's base-files package ships these on every Debian/Ubuntu machine; one of each family (GPL-2 and LGPL-2.1
# repeat GPL-3 and LGPL-3 nearly word for word). Legal English: no mpokit corpus or mix holds any of it.
LICENSE_DIR = Path("/usr/share/common-licenses")
LICENSE_FILES = ("GPL-3", "GFDL-1.3", "Apache-2.0", "MPL-2.0", "Artistic", "CC0-1.0", "LGPL-3")
VIM_MANUAL = "vim-manual"  # the name load_corpus / --ood-data / --text give the Vim user manual (vim_manual_corpus)
VIM_DOCS = Path("/usr/share/vim")  # vim-runtime's help files live in vimNN/doc/ under it


@dataclass
class Corpus:
    text: str
    name: str


def load_corpus(text_file: str | None = None, dataset: str | None = None) -> Corpus:
    """A text file, the built-in mix ("mix", see mix_corpus), the licence texts ("licenses"), the Vim user manual
    ("vim-manual"), the pydoc corpus ("pydoc", also the default), a Hugging Face dataset
    ("name[:config[:split]]"), or the offline default.

    The default is the pydoc topics text that ships with CPython, so nothing is downloaded.
    A file literally named "mix", "licenses", "vim-manual" or "pydoc" is read as ./mix and so on.
    """
    if text_file == MIX:
        return mix_corpus()
    if text_file == LICENSES:
        return licenses_corpus()
    if text_file == VIM_MANUAL:
        return vim_manual_corpus()
    if text_file == PYDOC:
        return _pydoc_corpus()
    if text_file:
        path = Path(text_file)
        if not path.is_file():
            raise FileNotFoundError(f"missing text file: {path}")
        return Corpus(path.read_text(encoding="utf-8", errors="replace"), str(path))
    if dataset:
        try:
            import datasets
        except ImportError:
            raise ImportError("--dataset needs the `datasets` package: pip install datasets") from None
        name, config, split = (dataset.split(":") + [None, None])[:3]
        ds = datasets.load_dataset(name, config, split=split or "test")
        column = "text" if "text" in ds.column_names else ds.column_names[0]
        return Corpus("\n\n".join(ds[column]), f"hf:{dataset}")
    return _pydoc_corpus()


def _pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _pydoc_corpus() -> Corpus:
    return Corpus(_pydoc_text(), PYDOC_NAME)


def _pydoc_half(docs: str) -> int:
    """Where the second half of the pydoc text starts (at a paragraph): the mix reads only from there on."""
    return docs.index("\n\n", len(docs) // 2)


def _pydoc_second_half() -> str:
    """The pydoc text after the half, less the paragraphs the first half has too (topics repeat sections)."""
    docs = _pydoc_text()
    half = _pydoc_half(docs)
    seen = set(docs[:half].split("\n\n"))
    return "\n\n".join(p for p in docs[half:].split("\n\n") if p not in seen)


def pydoc_first_half() -> Corpus:
    """The first half of the offline default corpus: text the mix never holds (an out-of-domain check for
    models tuned on the mix). Its start is the default corpus's start, so short prefixes score alike."""
    docs = _pydoc_text()
    return Corpus(docs[:_pydoc_half(docs)], f"{PYDOC_NAME}, first half")


def licenses_corpus(folder: Path | None = None) -> Corpus:
    """Seven software licences (GPL-3, GFDL-1.3, Apache-2.0, MPL-2.0, Artistic, CC0-1.0, LGPL-3; about 25k
    SmolLM2 tokens) from `folder`: English of a domain (law) that no mpokit corpus, mix or benchmark tunes on,
    offline wherever Debian's base-files is installed. folder None: LICENSE_DIR."""
    folder = LICENSE_DIR if folder is None else Path(folder)
    missing = [n for n in LICENSE_FILES if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"missing licence texts {missing} in {folder} (Debian's base-files package)")
    text = "\n\n".join((folder / n).read_text(encoding="utf-8", errors="replace") for n in LICENSE_FILES)
    return Corpus(text, f"{LICENSES}: {folder} ({', '.join(LICENSE_FILES)})")


def vim_manual_corpus(folder: Path | None = None) -> Corpus:
    """The Vim user manual (usr_*.txt of the newest vimNN/doc under `folder`, default VIM_DOCS; about 160k
    SmolLM2 tokens of task-oriented prose about an editor), offline wherever the vim-runtime package is
    installed. No mpokit mix or default holds it: bench_recovery chooses recipes on it (a validation text),
    so that the licence texts stay a test text nobody tuned for."""
    folder = VIM_DOCS if folder is None else Path(folder)
    docs = sorted(folder.glob("vim*/doc"))
    files = sorted(docs[-1].glob("usr_*.txt")) if docs else []
    if not files:
        raise FileNotFoundError(f"missing the Vim user manual (vim*/doc/usr_*.txt) under {folder} (the vim-runtime "
                                "package)")
    text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    return Corpus(text, f"{VIM_MANUAL}: {docs[-1]}/usr_*.txt ({len(files)} files)")


def default_calibration_corpus() -> Corpus:
    """What calibrated methods read when given no text: the mix where its sources are found (the shared data
    folder's WikiText-2 valid and SST-2 train), else the offline pydoc corpus. Either way the Corpus is named,
    and `mpokit compress` reports the name. (Evaluation's default text stays the pydoc corpus: never the mix.)"""
    from mpokit.data.paths import shared_data_dir

    if all(f.is_file() for f in _mix_files(shared_data_dir())):
        return mix_corpus()
    return _pydoc_corpus()


def default_ood_corpora() -> list[Corpus]:
    """The out-of-domain texts a run reports when none is named: the pydoc corpus's first half (never in the
    mix, but the mix holds its second half) and, where the machine has them, the licence texts (no source of
    the mix is near them)."""
    out = [pydoc_first_half()]
    try:
        out.append(licenses_corpus())
    except FileNotFoundError:
        pass  # not a Debian-based machine: the pydoc text alone, and the run's JSON names only it
    return out


def _chunks(text: str, size: int) -> list[str]:
    """Consecutive pieces of about `size` characters, cut after a space or newline (whole words)."""
    out, pos = [], 0
    while pos < len(text):
        end = min(pos + size, len(text))
        if end < len(text):
            cut = max(text.rfind(" ", pos + size // 2, end), text.rfind("\n", pos + size // 2, end))
            end = cut + 1 if cut >= 0 else end
        out.append(text[pos:end].strip())
        pos = end
    return [c for c in out if c]


def _mix_files(root: Path) -> tuple[Path, Path]:
    """The mix's two files in the shared data folder: WikiText-2 valid and SST-2 train."""
    return root / "wikitext-2" / "valid.txt", root / "sst2" / "train.tsv"


@lru_cache(maxsize=2)
def _mix_text(root: str, chunk: int) -> str:
    from mpokit.data.sst2 import read_sst2

    wiki, sst2 = _mix_files(Path(root))
    if not wiki.is_file():
        raise FileNotFoundError(f"missing {wiki} for the {MIX!r} corpus (set MPOKIT_DATA to the data folder)")
    sources = [wiki.read_text(encoding="utf-8", errors="replace"), _pydoc_second_half(),
               "\n".join(s for _, s in read_sst2(sst2))]
    parts = [_chunks(t, chunk) for t in sources]
    n = min(len(p) for p in parts)  # stop with the shortest source: every stretch of the mix stays mixed
    return "\n\n".join(p[k] for k in range(n) for p in parts)  # wiki, docs, sst2, wiki, docs, ...


def mix_corpus(chunk: int = MIX_CHUNK) -> Corpus:
    """The built-in calibration/training mix, offline: WikiText-2 valid (shared data folder), the second half
    of the pydoc topics text, and SST-2 train sentences, interleaved in chunks of about `chunk` characters
    (one chunk of each in turn, until the shortest source runs out), so every prefix of three chunks or more
    holds all three sources.

    The Python docs come from the second half of the offline default corpus, so `mpokit finetune --data mix`
    never trains on the start of that corpus, which it reports as the out-of-domain text.
    """
    from mpokit.data.paths import shared_data_dir

    if chunk < 64:
        raise ValueError(f"expected a mix chunk of at least 64 characters, got {chunk}")
    root = shared_data_dir()
    name = (f"{MIX}: WikiText-2 valid + pydoc_data.topics (second half) + SST-2 train sentences, "
            f"{chunk}-character chunks in turn")
    return Corpus(_mix_text(str(root), chunk), name)


def tokenize_prefix(tokenizer, text: str, tokens: int) -> torch.Tensor:
    """Token ids of the start of `text`, at least `tokens` long when the text allows."""
    chars = max(4096, tokens * 8)
    while True:
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) > tokens or chars >= len(text):
            return torch.tensor(ids[:tokens], dtype=torch.long)
        chars *= 2
