import math

import pytest
import torch

from common.losses.dino import DINOLoss


def _softmax(values: list[float], temperature: float) -> list[float]:
    exps = [math.exp(v / temperature) for v in values]
    return [e / sum(exps) for e in exps]


def _cross_entropy(p: list[float], q: list[float]) -> float:
    return -sum(pi * math.log(qi) for pi, qi in zip(p, q))


def test_two_views_match_a_hand_computation():
    # batch of one image, two global views, three prototypes, centre still zero
    student = [[0.2, -0.1, 0.5], [0.0, 0.3, -0.4]]
    teacher = [[0.1, 0.4, -0.2], [-0.3, 0.2, 0.6]]
    loss = DINOLoss(out_dim=3, student_temp=0.1, teacher_temp=0.05, warmup_teacher_temp=0.05)
    value = loss(torch.tensor(student), torch.tensor(teacher), iteration=0)

    s = [_softmax(v, 0.1) for v in student]
    t = [_softmax(v, 0.05) for v in teacher]
    expected = (_cross_entropy(t[0], s[1]) + _cross_entropy(t[1], s[0])) / 2
    assert value.item() == pytest.approx(expected, rel=1e-5)
    with_same_view_pairs = (expected * 2 + _cross_entropy(t[0], s[0]) + _cross_entropy(t[1], s[1])) / 4
    assert value.item() != pytest.approx(with_same_view_pairs, rel=1e-3)


def test_same_view_pairs_are_skipped():
    # the student predicts view 0 perfectly from view 0 only; only cross-view pairs count, so the loss
    # changes when view 1's output changes, and not when the same-view target is matched better
    loss = DINOLoss(out_dim=4, n_global_crops=2, center_momentum=0.0)
    teacher = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0]])
    far = loss(torch.tensor([[0, 0, 0, 9.0], [0, 0, 9.0, 0]]), teacher, iteration=10**6)
    loss.center.zero_()
    self_match = loss(torch.tensor([[9.0, 0, 0, 0], [0, 9.0, 0, 0]]), teacher, iteration=10**6)
    loss.center.zero_()
    cross_match = loss(torch.tensor([[0, 9.0, 0, 0], [9.0, 0, 0, 0]]), teacher, iteration=10**6)
    assert cross_match < far and self_match.item() == pytest.approx(far.item(), rel=1e-5)


def test_local_views_pair_with_every_global_view():
    loss = DINOLoss(out_dim=5, n_global_crops=2)
    student = torch.randn(4 * 3, 5)  # 2 global + 2 local views, batch 3
    teacher = torch.randn(2 * 3, 5)
    value = loss(student, teacher, iteration=0)
    s = torch.log_softmax(student / 0.1, -1).chunk(4)
    t = torch.softmax(teacher / 0.07, -1).chunk(2)  # no warm-up: teacher_temp from the start
    pairs = [(0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3)]
    expected = sum((-t[i] * s[j]).sum(-1).mean() for i, j in pairs) / len(pairs)
    assert torch.allclose(value, expected)


def test_center_is_an_ema_of_the_teacher_mean_and_is_saved():
    loss = DINOLoss(out_dim=3, center_momentum=0.9)
    teacher = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    loss(torch.zeros(4, 3), teacher, iteration=0)
    assert torch.allclose(loss.center, 0.1 * teacher.mean(0, keepdim=True))
    loss(torch.zeros(4, 3), teacher, iteration=1)
    assert torch.allclose(loss.center, (0.9 * 0.1 + 0.1) * teacher.mean(0, keepdim=True))
    restored = DINOLoss(out_dim=3)
    restored.load_state_dict(loss.state_dict())
    assert torch.equal(restored.center, loss.center)


def test_teacher_temperature_warms_up_linearly():
    loss = DINOLoss(out_dim=3, teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_iters=10)
    assert loss.teacher_temperature(0) == pytest.approx(0.04)
    assert loss.teacher_temperature(5) == pytest.approx(0.055)
    assert loss.teacher_temperature(10) == loss.teacher_temperature(999) == pytest.approx(0.07)


def test_gradients_reach_only_the_student():
    student = torch.randn(4, 6, requires_grad=True)
    teacher = torch.randn(4, 6, requires_grad=True)
    DINOLoss(out_dim=6)(student, teacher, iteration=0).backward()
    assert student.grad is not None and teacher.grad is None


def test_inconsistent_view_counts_are_rejected():
    loss = DINOLoss(out_dim=3, n_global_crops=2)
    with pytest.raises(ValueError, match="not a multiple of 2"):
        loss(torch.zeros(6, 3), torch.zeros(3, 3), iteration=0)
    with pytest.raises(ValueError, match="whole number"):
        loss(torch.zeros(5, 3), torch.zeros(4, 3), iteration=0)
    with pytest.raises(ValueError, match="center_momentum"):
        DINOLoss(out_dim=3, center_momentum=1.0)
