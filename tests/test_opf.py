import torch
from torch import nn

from conftest import tiny_bert
from mpokit.methods.opf import (contract_, expand_, expand_linear, fisher_scores, opf_layers, opf_layout, select_top,
                                stable_rank_scores)
from mpokit.train import fit

NAME = "bert.encoder.layer.0.intermediate.dense"


def _batch(n=8, seq=12):
    g = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, 96, (n, seq), generator=g), "attention_mask": torch.ones(n, seq, dtype=torch.long),
            "labels": torch.randint(0, 2, (n,), generator=g)}


class Rows(torch.utils.data.Dataset):
    def __init__(self, batch):
        self.b = batch

    def __len__(self):
        return len(self.b["labels"])

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.b.items()}


def test_layout_inserts_unit_dims_and_r_by_r_cores():
    od, idd = opf_layout(96, 48, base_cores=2, extra=2)
    assert od[1:3] == [1, 1] and idd[1:3] == [1, 1]
    layer = expand_linear(nn.Linear(48, 96))
    r = layer.bonds[0]
    for core in list(layer.cores)[1:3]:
        assert core.shape == (r, 1, 1, r)
    assert layer.core_params() > 96 * 48  # over-parameterized


def test_expand_is_lossless_and_contract_restores_architecture(bert):
    x = _batch()
    x.pop("labels")
    before = bert(**x).logits
    expand_(bert, [NAME])
    assert len(opf_layers(bert)) == 1
    torch.testing.assert_close(bert(**x).logits, before, atol=1e-5, rtol=1e-4)
    contract_(bert)
    assert type(bert.get_submodule(NAME)) is nn.Linear and not opf_layers(bert)
    torch.testing.assert_close(bert(**x).logits, before, atol=1e-5, rtol=1e-4)


def test_expanded_tensors_get_gradients_and_move_with_optimizer_built_after_swap(bert, tmp_path):
    expand_(bert, [NAME])
    layer = bert.get_submodule(NAME)
    start = [c.detach().clone() for c in layer.cores]
    out = bert(**_batch())
    out.loss.backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in layer.cores)
    bert.zero_grad()
    res = fit(bert, Rows(_batch()), str(tmp_path), max_steps=3, batch_size=4, lr=1e-2)
    assert res.global_step == 3
    moved = [float((c.detach() - s).abs().max()) for c, s in zip(layer.cores, start)]
    assert all(m > 1e-6 for m in moved), moved  # inserted r x r cores included
    w_trained = layer.full_weight().detach().clone()
    contract_(bert)
    torch.testing.assert_close(bert.get_submodule(NAME).weight, w_trained)


def test_selection_by_fisher_and_stable_rank(bert):
    names = [n for n, m in bert.named_modules() if isinstance(m, nn.Linear) and ".encoder." in n]
    fisher = fisher_scores(bert, names, [_batch()])
    assert set(fisher) == set(names) and all(v >= 0 for v in fisher.values())
    assert max(fisher.values()) > 0
    assert all(p.grad is None for p in bert.parameters())
    top = select_top(fisher, 2)
    assert len(top) == 2 and fisher[top[0]] >= sorted(fisher.values())[-2] - 1e-30
    # stable rank: rank-1 weight has srank 1, a random one much more
    with torch.no_grad():
        bert.get_submodule(names[0]).weight.copy_(torch.outer(torch.randn(48), torch.randn(48)))
    sr = stable_rank_scores(bert, names)
    assert abs(sr[names[0]] - 1) < 1e-3 and sr[names[1]] > 3
    assert select_top(sr, 1, largest=False) == [names[0]]
