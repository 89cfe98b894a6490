"""keep_indices / keep_counts checked once, at a boundary: each problem named, padding zeroed, valid rows kept."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from maskedkd.keep import KeepIndicesError, check_keep, num_keep

pytestmark = pytest.mark.dtype("none")  # no model numerics


def test_valid_rows_pass_and_padding_is_zeroed() -> None:
    indices = torch.tensor([[5, 3, 9], [7, 63, 63]], dtype=torch.int16)  # row 1's padding repeats: not read
    out, counts = check_keep(indices, torch.tensor([3, 2]), batch=2, num_patches=64)
    assert out.dtype == counts.dtype == torch.int64
    assert out.tolist() == [[5, 3, 9], [7, 63, 0]] and counts.tolist() == [3, 2]
    out, counts = check_keep(indices[:1], None, batch=1, num_patches=64)
    assert out.tolist() == [[5, 3, 9]] and counts.tolist() == [3]


@pytest.mark.parametrize(
    ("indices", "counts", "message"),
    [
        ([[0, 64]], None, r"keep_indices\[0, 1\] = 64 is out of range: the teacher grid has positions 0..63"),
        ([[-1, 2]], None, r"keep_indices\[0, 0\] = -1 is out of range"),
        ([[4, 4, 1]], None, "keep_indices row 0 repeats position 4"),
        ([[1, 2, 3]], [4], r"keep_counts\[0\] = 4 disagrees with K = 3"),
        ([[1, 2, 3]], [0], r"keep_counts\[0\] = 0"),
        ([[1, 2, 3]], [3, 3], r"keep_counts: shape \[2\] must be \[B\] = \[1\]"),
        ([[1, 2], [3, 4]], None, r"keep_indices: shape \[2, 2\] must be \[B, K\] with B = 1"),
        ([[]], None, "K = 0; keep at least one patch"),
        ([list(range(65))], None, "K = 65 exceeds the 64 patches"),
        ([[1.0, 2.0]], None, "dtype float32 is not an integer type"),
    ],
)
def test_each_problem_is_named(indices: list, counts: list | None, message: str) -> None:
    dtype = torch.float32 if indices and indices[0] and isinstance(indices[0][0], float) else torch.int64
    with pytest.raises(KeepIndicesError, match=message):
        check_keep(
            torch.tensor(indices, dtype=dtype),
            None if counts is None else torch.tensor(counts),
            batch=1,
            num_patches=64,
        )


def test_random_rows_against_a_plain_python_reference() -> None:
    # Accepts exactly the batches whose used entries are on the grid and distinct per row; padding never matters.
    g = torch.Generator().manual_seed(0)
    n = 8
    for case in range(400):
        batch, k = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 7, (1,), generator=g))
        indices = torch.randint(-1, n + 2, (batch, k), generator=g)
        if case % 2:  # half of them valid: a permutation's first k positions, padding left as garbage
            indices = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(batch)])
        counts = None if case % 3 == 0 else torch.randint(1, k + 1, (batch,), generator=g)
        used = [k if counts is None else int(c) for c in (counts if counts is not None else [k] * batch)]
        rows = [[int(v) for v in row[:u]] for row, u in zip(indices.tolist(), used, strict=True)]
        valid = all(0 <= v < n for row in rows for v in row) and all(len(set(row)) == len(row) for row in rows)
        if not valid:
            with pytest.raises(KeepIndicesError):
                check_keep(indices.to(torch.int16), counts, batch=batch, num_patches=n)
            continue
        out, out_counts = check_keep(indices.to(torch.int16), counts, batch=batch, num_patches=n)
        assert out.tolist() == [row + [0] * (k - len(row)) for row in rows]
        assert out_counts.tolist() == used


def test_a_keep_fraction_keeps_the_floor_of_its_exact_share_of_the_patches() -> None:
    """The one rounding the client's selection, the server's hints and the benchmarks share, against exact rational
    arithmetic on the fraction as written (no tensors: dtype none): 0.29 of 100 patches is 29, not 28."""
    for total in range(1, 260):
        for hundredths in range(1, 101):
            keep = hundredths / 100
            exact = math.floor(Fraction(str(keep)) * total)
            assert num_keep(keep, total) == max(1, exact), (keep, total)
    assert num_keep(7, 64) == 7 and num_keep(64, 64) == 64  # an int is a count


@pytest.mark.parametrize(
    ("keep", "message"),
    [(0.0, r"outside \(0, 1\]"), (1.5, r"outside \(0, 1\]"), (0, r"keep count 0 is outside \[1, 64\]"),
     (65, r"keep count 65 is outside \[1, 64\]"), (True, "fraction in"), ("0.5", "fraction in")],
)  # fmt: skip
def test_a_keep_outside_its_range_is_refused_with_the_range(keep: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        num_keep(keep, 64)  # type: ignore[arg-type]
