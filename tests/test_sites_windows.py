"""Windows of T frames: one vectorised gather, random starts from an explicit generator."""

from __future__ import annotations

import numpy as np
import pytest

from brainjepa.errors import DataError
from sites.windows import check_lengths, fixed_windows, gather, multi_windows, pack, random_windows


def series(lengths=(40, 25, 33), n_rois=3):
    # value = 1000 * subject + 100 * roi + frame: every window's content is checkable
    return [
        (1000 * i + 100 * np.arange(n_rois)[:, None] + np.arange(n)[None, :]).astype(np.float32)
        for i, n in enumerate(lengths)
    ]


def test_gather_matches_slicing():
    s = series()
    p = pack(s, ["a", "b", "c"])
    x = gather(p, np.array([2, 0, 0]), np.array([5, 0, 30]), 10)  # (B, R, T)
    assert x.shape == (3, 3, 10) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0], s[2][:, 5:15])
    np.testing.assert_array_equal(x[1], s[0][:, 0:10])
    np.testing.assert_array_equal(x[2], s[0][:, 30:40])
    with pytest.raises(DataError, match="does not fit"):
        gather(p, np.array([1]), np.array([20]), 10)


def test_random_windows_deterministic_and_in_bounds():
    p = pack(series())
    idx = np.array([0, 1, 2] * 200)
    x1, st1 = random_windows(p, idx, 20, np.random.default_rng(7))
    x2, st2 = random_windows(p, idx, 20, np.random.default_rng(7))
    np.testing.assert_array_equal(st1, st2)
    np.testing.assert_array_equal(x1, x2)
    span = p.lengths[idx] - 20
    assert (st1 >= 0).all() and (st1 <= span).all()
    assert {int(st1[idx == 1].max())} == {5} and st1[idx == 0].max() == 20  # every start reachable
    np.testing.assert_array_equal(x1[:, 0, 0] % 1000, st1)  # window content starts at the drawn frame
    _, st3 = random_windows(p, idx, 20, np.random.default_rng(7), max_start=3)
    assert st3.max() == 3


def test_fixed_and_multi_windows():
    s = series()
    p = pack(s)
    c = fixed_windows(p, 25, "center")
    np.testing.assert_array_equal(c[0], s[0][:, 7:32])
    np.testing.assert_array_equal(fixed_windows(p, 25, "start")[2], s[2][:, :25])
    m = multi_windows(p, 25, 3)  # (N, W, R, T)
    assert m.shape == (3, 3, 3, 25)
    np.testing.assert_array_equal(m[0, :, 0, 0], [0, 8, 15])  # evenly from first to last start
    np.testing.assert_array_equal(m[1, :, 0, 0] % 1000, [0, 0, 0])


def test_too_short_error_or_skip():
    p = pack(series(), ["a", "b", "c"])
    with pytest.raises(DataError, match=r"1 series shorter than the window of 30 frames .*\['b'\] with \[25\]"):
        check_lengths(p, 30)
    np.testing.assert_array_equal(check_lengths(p, 30, skip=True), [0, 2])
    with pytest.raises(DataError, match="shorter than the window"):
        fixed_windows(p, 30)
    with pytest.raises(DataError, match="different ROI counts"):
        pack([np.zeros((3, 5)), np.zeros((4, 5))])
