"""round_up: the least multiple at or above n."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flashu_fx.shapes import round_up


@given(n=st.integers(-1000, 10**6), multiple=st.integers(1, 4096))
def test_round_up_is_the_least_multiple_at_or_above_n(n: int, multiple: int) -> None:
    up = round_up(n, multiple)
    assert up % multiple == 0 and n <= up < n + multiple


@pytest.mark.parametrize("multiple", [0, -16])
def test_round_up_refuses_a_multiple_below_one(multiple: int) -> None:
    with pytest.raises(ValueError, match=rf"multiple={multiple} is invalid: allowed an integer >= 1"):
        round_up(10, multiple)
