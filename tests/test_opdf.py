import copy

import pytest
import torch

from mpokit.methods.opdf import expand_teacher_like_, kd_loss, make_distill_loss, tensor_constraint_loss
from mpokit.methods.opf import expand_

NAMES = ["bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.1.output.dense"]


def _pair(bert):
    teacher = copy.deepcopy(bert)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    expand_(bert, NAMES)
    assert expand_teacher_like_(teacher, bert) == NAMES
    return bert, teacher


def _batch():
    return {"input_ids": torch.randint(0, 96, (4, 10)), "labels": torch.randint(0, 2, (4,))}


def test_tensor_constraint_has_gradient_and_changes_student(bert):
    student, teacher = _pair(bert)
    loss = tensor_constraint_loss(student, teacher)
    assert loss > 0
    loss.backward()
    layer = student.get_submodule(NAMES[0])
    aux = [c for k, c in enumerate(layer.cores) if k != layer.central_index]
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in aux)
    assert layer.cores[layer.central_index].grad is None  # only auxiliary cores are constrained
    before = [c.detach().clone() for c in aux]
    opt = torch.optim.SGD(student.parameters(), lr=10.0)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = tensor_constraint_loss(student, teacher)
        losses.append(loss.item())
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]
    assert all(not torch.equal(c, b) for c, b in zip(aux, before))


def test_constraint_via_state_dict_would_be_detached(bert):
    # negative control for the research-code defect: state_dict() tensors carry no graph
    student, _ = _pair(bert)
    assert all(not t.requires_grad for t in student.state_dict().values())


def test_distill_loss_combines_task_kd_and_constraint(bert):
    student, teacher = _pair(bert)
    batch = _batch()
    plain, _ = make_distill_loss(teacher, alpha=0.5, beta=0.0)(student, batch)
    with_tc, out = make_distill_loss(teacher, alpha=0.5, beta=1.0)(student, batch)
    torch.testing.assert_close(with_tc - plain, tensor_constraint_loss(student, teacher))
    with_tc.backward()
    assert student.get_submodule(NAMES[0]).cores[0].grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    logits = torch.randn(3, 5)
    assert float(kd_loss(logits, logits)) == pytest.approx(0.0, abs=1e-6)


def test_constraint_needs_matching_layers(bert):
    with pytest.raises(ValueError, match="matching"):
        tensor_constraint_loss(bert, copy.deepcopy(bert))
