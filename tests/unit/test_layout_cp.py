"""Issue 9.4: context parallelism is not wired (no sequence split, no loss correction): refused."""
import pytest

from megatron_tanuki.runtime.distributed import LayoutError, ParallelLayout


def test_cp_greater_than_one_is_refused_with_the_reason():
    with pytest.raises(LayoutError) as e:
        ParallelLayout(cp=2).validate(2)
    assert str(e.value) == ("context parallel CP=2 is not implemented in megatron_tanuki yet "
                            "(no sequence split or loss correction): use cp=1")


def test_cp_one_is_accepted():
    ParallelLayout(cp=1, tp=2).validate(2)
