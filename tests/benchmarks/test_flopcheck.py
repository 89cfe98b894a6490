"""The FLOP reference's counter on the CPU's fused attention kernel, which older torch counts as 0 FLOPs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.compute.flopcheck import flop_counter

pytestmark = pytest.mark.dtype("float32")  # one float32 attention call, on the CPU


def test_counts_the_cpu_attention_kernel_as_two_matrix_products() -> None:
    b, h, s_q, s_k, d = 2, 3, 5, 7, 8
    q = torch.randn(b, h, s_q, d)
    k, v = torch.randn(b, h, s_k, d), torch.randn(b, h, s_k, d)
    with torch.inference_mode(), flop_counter() as counter:
        F.scaled_dot_product_attention(q, k, v)
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    # q @ k^T and scores @ v, 2 FLOPs per multiply-add, written out here apart from torch's formula
    expected = 2 * (b * h * s_q * d * s_k) + 2 * (b * h * s_q * s_k * d)
    assert by_op == {"aten._scaled_dot_product_flash_attention_for_cpu": expected}
