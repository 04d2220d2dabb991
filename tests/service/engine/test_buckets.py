from hypothesis import given
from hypothesis import strategies as st

from service.engine.buckets import padding_ratio, plan_buckets


def cost(lengths: list[int], groups: list[list[int]], overhead: int) -> int:
    return sum(len(g) * max(lengths[i] for i in g) + overhead for g in groups)


def test_similar_lengths_share_one_call_and_outliers_get_their_own() -> None:
    lengths = [3, 4, 3, 200, 4]
    assert plan_buckets(lengths, overhead=10_000) == [[0, 2, 1, 4, 3]]  # one call when calls are dear
    groups = plan_buckets(lengths, overhead=16)
    assert sorted(map(sorted, groups)) == [[0, 1, 2, 4], [3]]
    assert padding_ratio([3, 4, 3, 200, 4]) > 0.75 and padding_ratio([3, 4, 3, 4]) < 0.15


@given(st.lists(st.integers(1, 64), min_size=1, max_size=12), st.integers(0, 300))
def test_plan_is_a_partition_no_worse_than_one_call(lengths: list[int], overhead: int) -> None:
    groups = plan_buckets(lengths, overhead)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert cost(lengths, groups, overhead) <= cost(lengths, [list(range(len(lengths)))], overhead)
