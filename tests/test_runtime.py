"""Process-level settings of sdpo.runtime."""

import pytest
import torch

from sdpo.runtime import flushed_denormals

SUBNORMAL = 1e-40  # below float32's smallest normal number (1.18e-38)


def _scaled(value: float) -> float:
    return (torch.tensor([value], dtype=torch.float32) * 1.5).item()


def test_subnormals_are_flushed_inside_the_block_and_kept_after_it():
    assert _scaled(SUBNORMAL) > 0  # the default: subnormal arithmetic
    with flushed_denormals():
        assert _scaled(SUBNORMAL) == 0.0
        assert _scaled(1e-30) > 0  # normal small values are untouched
    assert _scaled(SUBNORMAL) > 0


def test_the_flag_is_off_again_when_the_block_raises():
    with pytest.raises(RuntimeError, match="boom"), flushed_denormals():
        raise RuntimeError("boom")
    assert _scaled(SUBNORMAL) > 0
