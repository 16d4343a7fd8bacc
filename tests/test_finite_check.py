"""The encoder's one-pass finiteness check: a NaN/inf anywhere is refused, finite inputs whose sum overflows
are not."""

import pytest
import torch

from sae_fast import ops
from sae_fast.errors import UserError


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_finite_inputs_with_an_overflowing_sum_pass(dtype):
    big = torch.finfo(dtype).max / 2
    x = torch.full((64, 8), big, dtype=dtype)
    W = torch.eye(8, dtype=dtype)[:4]
    if dtype != torch.float16:  # the fast path's sum overflows: the element-wise check must decide
        assert not ops._all_finite([x])
    ops._check_encoder("topk_encode", x, W, torch.zeros(4, dtype=dtype))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_one_bad_value_is_found(bad):
    x = torch.randn(300, 16)
    x[217, 3] = bad
    with pytest.raises(UserError, match="x row 217"):
        ops._check_encoder("topk_encode", x, torch.randn(32, 16), torch.zeros(32))
