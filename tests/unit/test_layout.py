"""The tensor layout: axes, multi-indices, folding tokens onto slots by position id."""

from __future__ import annotations

import math

import pytest
import torch

from ctxext.attention.layout import compact_axes, fold, full_axes, multi_index, plan_fold, unfold

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "n,block_sizes,full,compact",
    [
        (20, (16, 16), (1, 16, 16), (2, 16)),
        (1, (128,), (1, 128), (1,)),
        (113, (128,), (1, 128), (113,)),
        (128, (128,), (1, 128), (128,)),
        (129, (128,), (2, 128), (2, 128)),
        (256, (16, 16), (1, 16, 16), (16, 16)),
        (257, (16, 16), (2, 16, 16), (2, 16, 16)),
        (300, (16, 16), (2, 16, 16), (2, 16, 16)),
        (1023, (8, 8), (16, 8, 8), (16, 8, 8)),
        (4097, (64,), (65, 64), (65, 64)),
        (9, (4, 4, 9), (1, 4, 4, 9), (9,)),
        (10, (4, 4, 9), (1, 4, 4, 9), (2, 9)),
        (37, (3, 4), (4, 3, 4), (4, 3, 4)),
        (7, (3, 4), (1, 3, 4), (2, 4)),
    ],
)
def test_axes(n, block_sizes, full, compact):
    assert full_axes(n, block_sizes) == full
    assert compact_axes(n, block_sizes) == compact


@pytest.mark.parametrize("block_sizes", [(4,), (3, 4), (5, 3), (2, 3, 2), (16, 16), (4, 4, 9)], ids=str)
def test_compact_axes_keep_every_multi_index(block_sizes):
    """Dropping leading size-1 axes never moves a token: trailing indices agree, dropped ones are 0."""
    for n in [1, 2, 3, 5, 11, 12, 13, 29, 63, 100, 257, 301]:
        full, compact = full_axes(n, block_sizes), compact_axes(n, block_sizes)
        assert full[-len(compact) :][1:] == compact[1:]
        assert compact[0] <= full[len(full) - len(compact)]
        span = math.prod(block_sizes)
        assert n <= math.prod(compact) < n + span, "pads less than one outer slice"
        assert math.prod(compact) % compact[-1] == 0
        fi, ci = multi_index(n, full), multi_index(n, compact)
        m = len(compact)
        assert torch.equal(fi[:, -m:], ci), (n, full, compact)
        assert (fi[:, :-m] == 0).all()
        assert len(compact) == 1 or compact[0] > 1, "a leading size-1 axis was kept"


@pytest.mark.parametrize("axes", [(5,), (4, 3), (2, 3, 4), (3, 1, 5), (2, 2, 2, 3)], ids=str)
def test_multi_index_round_trip(axes):
    n = math.prod(axes)
    idx = multi_index(n, axes)
    assert idx.shape == (n, len(axes)) and idx.dtype == torch.long
    strides = torch.tensor([math.prod(axes[j + 1 :]) for j in range(len(axes))])
    assert torch.equal((idx * strides).sum(-1), torch.arange(n))
    assert ((idx >= 0) & (idx < torch.tensor(axes))).all()
    # Row-major: the last index moves fastest; rows are distinct.
    assert len({tuple(r) for r in idx.tolist()}) == n
    assert idx[1].tolist() == [0] * (len(axes) - 1) + [1 % axes[-1]] or axes[-1] == 1


def test_multi_index_example():
    idx = multi_index(14, (4, 3, 4))
    assert idx[13].tolist() == [1, 0, 1]
    assert idx[11].tolist() == [0, 2, 3]
    assert multi_index(5, (2, 4)).tolist() == [[0, 0], [0, 1], [0, 2], [0, 3], [1, 0]]


def test_plan_identity_cases():
    plan = plan_fold(2, 9, None, None, CPU)
    assert plan.is_identity and plan.real is None and plan.valid is None and plan.n_slots == 9
    plan = plan_fold(2, 9, torch.arange(9)[None], torch.ones(2, 9), CPU)
    assert plan.is_identity and plan.real is None and plan.n_slots == 9
    plan = plan_fold(2, 9, torch.arange(9), None, CPU)  # 1-D position ids
    assert plan.is_identity


def test_plan_right_padding_without_positions():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    plan = plan_fold(2, 5, None, mask, CPU)
    assert plan.n_slots == 5 and plan.positions is None
    assert plan.slot[0].tolist()[:3] == [0, 1, 2] and plan.slot[1].tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(plan.real, mask.bool()) and torch.equal(plan.valid, mask.bool())


def test_plan_left_padding_without_shifted_positions_packs_real_tokens_first():
    """A plain forward with an attention mask: positions are arange, real tokens still start at slot 0."""
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    plan = plan_fold(2, 5, None, mask, CPU)
    assert plan.slot[0].tolist()[2:] == [0, 1, 2]
    assert plan.valid.tolist() == [[True, True, True, False, False], [True] * 5]
    assert plan.positions[0, :3].tolist() == [2, 3, 4] and plan.positions[1].tolist() == [0, 1, 2, 3, 4]


def test_plan_left_padding_with_shifted_positions():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    plan = plan_fold(3, 5, pos, mask, CPU)
    assert not plan.is_identity
    assert plan.n_slots == 5
    assert plan.slot[0].tolist() == [0, 0, 0, 1, 2] and plan.slot[2].tolist() == [0, 0, 0, 0, 0]
    assert plan.valid.tolist() == [
        [True, True, True, False, False],
        [True, True, True, True, True],
        [True, False, False, False, False],
    ]
    assert torch.equal(plan.real, mask.bool())


def test_plan_position_gaps_and_broadcast():
    pos = torch.tensor([[0, 2, 3, 7]])
    plan = plan_fold(2, 4, pos, None, CPU)  # (1, N) position ids broadcast over the batch
    assert plan.is_identity and plan.n_slots == 4 and plan.valid is None and plan.real is None
    assert plan.positions.tolist() == [[0, 2, 3, 7]] * 2


def test_plan_fully_padded_batch():
    mask = torch.zeros(2, 6)
    pos = torch.zeros(2, 6, dtype=torch.long)
    plan = plan_fold(2, 6, pos, mask, CPU)
    assert plan.n_slots >= 1
    assert not plan.valid.any()


@pytest.mark.parametrize(
    "pos,mask,match",
    [
        ([[0, 1, 1, 2]], None, "increase strictly"),
        ([[0, 2, 1, 3]], None, "increase strictly"),
        ([[0, 1, 2, 0]], [[1, 1, 1, 1]], "increase strictly"),
        ([[-1, 0, 1, 2]], None, ">= 0"),
    ],
)
def test_plan_errors(pos, mask, match):
    mask = None if mask is None else torch.tensor(mask)
    with pytest.raises(ValueError, match=match):
        plan_fold(1, 4, torch.tensor(pos), mask, CPU)


def test_plan_repeated_positions_of_padding_are_allowed():
    mask = torch.tensor([[0, 0, 1, 1]])
    plan = plan_fold(1, 4, torch.tensor([[0, 0, 0, 1]]), mask, CPU)  # pads share position 0 with a real token
    assert plan.n_slots == 2 and plan.valid.all()


def test_plan_refuses_quadratic_mask():
    with pytest.raises(ValueError, match=r"O\(N\) masks"):
        plan_fold(1, 4, None, torch.ones(1, 4, 4), CPU)


def _fold_cases():
    mask_left = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    pos_left = (mask_left.cumsum(-1) - 1).clamp_min(0)
    mask_holes = torch.tensor([[1, 0, 1, 1, 0, 0, 1], [0, 1, 1, 1, 1, 1, 0]])
    return {
        "left-shifted": (pos_left, mask_left),
        "holes-arange": (None, mask_holes),
        "gaps": (torch.tensor([[0, 1, 4, 5, 6, 9, 10], [1, 2, 3, 4, 5, 6, 8]]), None),
        "gaps-and-padding": (torch.tensor([[0, 0, 0, 2, 3, 7, 8], [0, 1, 2, 3, 4, 5, 6]]), mask_left),
        "none": (None, None),
    }


@pytest.mark.parametrize("name", list(_fold_cases()))
def test_fold_unfold(name):
    pos, mask = _fold_cases()[name]
    b, h, n, d = 2, 3, 7, 4
    x = torch.randn(b, h, n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    plan = plan_fold(b, n, pos, mask, CPU)
    real = torch.ones(b, n, dtype=torch.bool) if mask is None else mask.bool()
    rank = real.long().cumsum(-1) - 1  # real tokens go to consecutive slots
    slots = fold(x, plan)
    assert slots.shape == (b, h, plan.n_slots, d)
    for bi in range(b):
        for t in range(n):
            if real[bi, t]:  # each real token lands on the slot of its rank, alone
                assert torch.equal(slots[bi, :, rank[bi, t]], x[bi, :, t])
        occupied = set(range(int(real[bi].sum())))
        for s in range(plan.n_slots):
            if s not in occupied and not plan.is_identity:
                assert (slots[bi, :, s] == 0).all(), "padding leaked into an empty slot"
            if plan.valid is not None:
                assert bool(plan.valid[bi, s]) == (s in occupied)
    if plan.is_identity:  # no padding: nothing moves
        assert slots is x and mask is None
    back = unfold(slots, plan)
    assert back.shape == x.shape
    rm = real[:, None, :, None].expand_as(x)
    assert torch.equal(back[rm], x[rm]), "fold then unfold must be the identity on real tokens"
    assert (back[~rm] == 0).all(), "padding tokens must come back as zeros"


def test_fold_unfold_carry_gradients():
    mask = torch.tensor([[0, 1, 1, 1]])
    pos = torch.tensor([[0, 0, 1, 2]])
    plan = plan_fold(1, 4, pos, mask, CPU)
    x = torch.randn(1, 1, 4, 2, dtype=torch.float64, requires_grad=True)
    unfold(fold(x, plan) * 3, plan).sum().backward()
    assert x.grad[0, 0, :, 0].tolist() == [0.0, 3.0, 3.0, 3.0]
