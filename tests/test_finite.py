"""The per-step finiteness check: exact for NaN and infinities, not fooled by sums that overflow."""

from __future__ import annotations

import pytest
import torch

from diffin_lightning.finite import all_finite


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_large_finite_values_whose_sum_overflows_are_finite(dtype):
    big = torch.finfo(dtype).max
    assert all_finite([torch.full((8,), big, dtype=dtype), torch.full((3,), -big, dtype=dtype)])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_one_non_finite_element_anywhere_is_found(bad, dtype):
    tensors = [torch.randn(50, 7).to(dtype), torch.randn(13).to(dtype)]
    tensors[0][31, 4] = bad
    assert not all_finite(tensors)
    # Next to values that overflow the sum: the exact test still finds it.
    tensors = [torch.full((4,), torch.finfo(dtype).max, dtype=dtype), torch.tensor([1.0, bad], dtype=dtype)]
    assert not all_finite(tensors)


def test_integers_empty_and_nothing():
    assert all_finite([])
    assert all_finite([torch.empty(0), torch.arange(5), torch.ones(2, dtype=torch.bool)])
    assert not all_finite([torch.arange(5), torch.tensor([float("nan")])])


def test_complex():
    assert all_finite([torch.tensor([1 + 2j])])
    assert not all_finite([torch.tensor([complex(float("nan"), 0.0)])])
    assert not all_finite([torch.tensor([complex(0.0, float("inf"))])])


def test_the_device_flag_agrees_with_the_exact_test_and_reads_nothing_back():
    from diffin_lightning.finite import finite_flag
    from test_host_sync import _ReadBacks

    tensors = [torch.randn(50, 7), torch.randn(13, dtype=torch.float64), torch.arange(4)]
    with _ReadBacks() as watch:  # the flags are made under the watch; the test's own bool(...) reads after it
        flag = finite_flag(tensors)
        broken_flags = {}
        for bad in (float("nan"), float("inf"), float("-inf")):
            broken = [t.clone() for t in tensors]
            broken[1][7] = bad
            broken_flags[bad] = (finite_flag(broken), broken)
        empty = finite_flag([], device=torch.device("cpu"))
        # The documented difference: no exact second test, so a float32 sum that overflows reads as non-finite.
        big = torch.full((4,), torch.finfo(torch.float32).max)
        overflowed = finite_flag([big])
    assert watch.where == [], watch.where
    assert flag.dtype == torch.bool and flag.shape == () and bool(flag)
    for broken_flag, broken in broken_flags.values():
        assert not bool(broken_flag) and not all_finite(broken)
    assert bool(empty)
    assert all_finite([big]) and not bool(overflowed)


@pytest.mark.parametrize("fused", [False, True])
def test_the_fused_and_the_per_tensor_sums_find_the_same_non_finite_tensors(fused):
    """The per-step check's two ways (CUDA takes the fused one; forced here on the CPU): one number per floating
    tensor, non-finite exactly where the tensor holds a NaN or an infinity, whatever the dtypes mixed in the list."""
    from diffin_lightning.finite import _float32_sums

    dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float32]
    for bad in (None, float("nan"), float("inf"), float("-inf")):
        for where in range(len(dtypes)):
            tensors = [torch.randn(9, 4).to(dtype) for dtype in dtypes] + [torch.arange(6)]
            if bad is not None:
                tensors[where][5, 2] = bad
            sums = _float32_sums(tensors, fused=fused)
            assert sums.dtype == torch.float32 and sums.shape == (len(dtypes),)  # the integer tensor left out
            finite = torch.isfinite(sums)
            assert bool(finite.all()) == (bad is None)
            if bad is not None:
                # Each dtype's group is checked; the number that went non-finite is its tensor's group's.
                assert int((~finite).sum()) == 1
    assert _float32_sums([torch.arange(3)], fused=fused).shape == (0,)
    # Half precision that a half-precision sum would overflow (4 x 60000 > 65504): finite in float32.
    assert bool(torch.isfinite(_float32_sums([torch.full((4,), 60000.0, dtype=torch.float16)], fused=fused)).all())


def test_the_fused_check_falls_back_to_the_sums_where_foreach_norm_takes_no_dtype(monkeypatch):
    """torch 2.3 (the oldest torch the package allows) has no dtype argument on _foreach_norm: the sums decide there."""
    from diffin_lightning.finite import _float32_sums

    def old_foreach_norm(tensors, ord=2):  # noqa: A002 (torch's own argument name)
        return [torch.linalg.vector_norm(t, ord) for t in tensors]

    monkeypatch.setattr(torch, "_foreach_norm", old_foreach_norm)
    tensors = [torch.randn(5, dtype=torch.float16), torch.tensor([1.0, float("nan")])]
    sums = _float32_sums(tensors, fused=True)
    assert sums.dtype == torch.float32 and sums.shape == (2,) and not bool(torch.isfinite(sums).all())
    assert bool(torch.isfinite(_float32_sums(tensors[:1], fused=True)).all())
