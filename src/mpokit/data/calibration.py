"""What a calibrated method reads: one value for text, pre-tokenized batches and their sizes.

Methods take `calibration=Calibration(...)`; the older `calibration_text=` / `batches=` keywords
map onto one through `as_calibration`, so every method resolves its input the same way
(mpokit.calibration.stats.resolve_calibration turns it into token windows).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mpokit.data.corpus import default_calibration_corpus, load_corpus

__all__ = ["Calibration", "as_calibration"]


@dataclass(frozen=True)
class Calibration:
    """Calibration input for activation-aware methods.

    text: the calibration text (None: data.corpus.default_calibration_corpus, the mix where the shared data
        folder has its sources, else the offline pydoc corpus).
    batches: pre-tokenized (1, T) LongTensors, used as they are (then text must be None).
    tokens, context: how many tokens, in windows of what length (None: the method config's
    calibration_tokens / calibration_context). Ignored for batches.
    name: where the input came from, for reports.
    """

    text: str | None = field(default=None, repr=False)
    batches: list[torch.Tensor] | None = field(default=None, repr=False)
    tokens: int | None = None
    context: int | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if self.text is not None and self.batches is not None:
            raise ValueError("expected Calibration(text=...) or Calibration(batches=...), got both")
        if self.text is not None and not isinstance(self.text, str):
            raise TypeError(f"expected Calibration.text to be a str, got {type(self.text).__name__}")
        for key in ("tokens", "context"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 2):
                raise ValueError(f"expected Calibration.{key} to be an integer >= 2 or None, got {value!r}")

    @classmethod
    def from_file(cls, path: str | Path | None, tokens: int | None = None, context: int | None = None
                  ) -> "Calibration":
        """The text of a file or named corpus, named after it (path None: default_calibration_corpus, named too)."""
        corpus = load_corpus(str(path)) if path is not None else default_calibration_corpus()
        return cls(text=corpus.text, tokens=tokens, context=context, name=corpus.name)

    @classmethod
    def mix(cls, tokens: int | None = None, context: int | None = None) -> "Calibration":
        """The built-in offline mix (WikiText-2 valid, Python docs, SST-2 sentences; see mpokit.data.corpus.mix_corpus).

        Also what calibrated methods read when given no text, where the shared data folder has its sources."""
        corpus = load_corpus("mix")
        return cls(text=corpus.text, tokens=tokens, context=context, name=corpus.name)


def as_calibration(calibration: Calibration | None = None, calibration_text: str | None = None,
                   batches: list[torch.Tensor] | None = None) -> Calibration:
    """The one Calibration of a method call: `calibration`, else the older keywords mapped onto one.

    As before, batches win over calibration_text when a caller passes both of the older keywords.
    """
    if calibration is None:
        return Calibration(batches=batches) if batches is not None else Calibration(text=calibration_text)
    if calibration_text is not None or batches is not None:
        given = [k for k, v in (("calibration_text", calibration_text), ("batches", batches)) if v is not None]
        raise ValueError(f"expected calibration= or the older {'/'.join(given)}=, got both; pass one "
                         "Calibration(text=..., batches=...) alone")
    if not isinstance(calibration, Calibration):
        raise TypeError(f"expected calibration to be a mpokit.Calibration, got {type(calibration).__name__} "
                        "(for a text: Calibration(text=...))")
    return calibration
