"""Metrics after training: classification accuracy, and labelled perplexity entries (the math lives in mpokit.eval).

Every figure names the text it was measured on; `mpokit finetune` never measures on its training text.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["accuracy", "perplexity_entry"]


@torch.no_grad()
def accuracy(model: nn.Module, dataset, collator, batch_size: int = 32) -> float:
    """Fraction of rows whose argmax logit equals the label."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    right = 0
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[k] for k in range(start, min(start + batch_size, len(dataset)))])
        labels = batch.pop("labels").to(device)
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits  # (B, num_labels)
        right += int((logits.argmax(-1) == labels).sum())
    model.train(was_training)
    return right / len(dataset)


def perplexity_entry(model: nn.Module, tokenizer, text: str, name: str, tokens: int, context: int, **labels) -> dict:
    """{"text": name, **labels, "perplexity", "tokens", "context"} over the first `tokens` tokens of `text`."""
    from mpokit.eval.perplexity import perplexity

    res = perplexity(model, tokenizer, text, tokens=tokens, context=context, progress=False, corpus_name=name)
    return {"text": name, **labels, "perplexity": res.perplexity, "tokens": res.tokens, "context": context}
