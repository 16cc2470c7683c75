"""The scalar head reads the LAST REAL token of each row, whatever the padding side."""

from __future__ import annotations

import pytest
import torch

from vlmalign.models.scalar_head import gather_last, last_token_index


def test_last_token_index_right_padding():
    # row 0: 3 real tokens then 2 pads -> last real index 2; row 1: full -> 4; row 2: 1 token -> 0
    mask = torch.tensor([[1, 1, 1, 0, 0],
                         [1, 1, 1, 1, 1],
                         [1, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 0]


def test_last_token_index_left_padding():
    # left padding puts every row's last real token at T - 1 = 4
    mask = torch.tensor([[0, 0, 1, 1, 1],
                         [1, 1, 1, 1, 1],
                         [0, 0, 0, 0, 1]])
    assert last_token_index(mask).tolist() == [4, 4, 4]


def test_gather_last_same_value_for_left_and_right_padded_copies():
    # the same three sequences (values 10.., 20.., 30..) padded both ways; pads hold junk (-99)
    seqs = [[10.0, 11.0, 12.0], [20.0, 21.0, 22.0, 23.0, 24.0], [30.0]]
    T = 5
    right = torch.tensor([s + [-99.0] * (T - len(s)) for s in seqs])
    left = torch.tensor([[-99.0] * (T - len(s)) + s for s in seqs])
    rmask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
    lmask = torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in seqs])
    # expected: each sequence's own last value 12, 24, 30, never a pad's -99
    assert gather_last(right, rmask).tolist() == [12.0, 24.0, 30.0]
    assert gather_last(left, lmask).tolist() == [12.0, 24.0, 30.0]


def test_gather_last_keeps_gradient_only_at_the_read_position():
    values = torch.zeros(2, 4, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    gather_last(values, mask).sum().backward()
    # d(sum)/d(values) is 1 at (0, 1) and (1, 3), zero elsewhere
    assert values.grad.tolist() == [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]]


def test_row_without_real_tokens_is_an_error():
    with pytest.raises(ValueError, match=r"rows \[1\] have no real token"):
        last_token_index(torch.tensor([[1, 0], [0, 0]]))
