"""MaskedKD student side: SIPS capture and patch selection (more parts live in submodules)."""
from __future__ import annotations

from student_client.sips import SIPSCapture, SIPSUnsupportedModelError, select_patches, sips_overhead_flops

__all__ = ["SIPSCapture", "SIPSUnsupportedModelError", "select_patches", "sips_overhead_flops"]
