"""Post-processing of maps (METHODS end of section 2)."""

from __future__ import annotations

import numpy as np
import pytest

from SegXAILib.attribution import normalise_000, postprocess
from SegXAILib.image import SegXAIInputError


def test_modes():
    values = np.array([[[[-2.0, -1.0], [0.5, 3.0]]]], dtype=np.float32)
    np.testing.assert_array_equal(postprocess(values, "signed"), values)
    np.testing.assert_array_equal(postprocess(values, "absolute"), np.abs(values))
    np.testing.assert_array_equal(postprocess(values, "positive"), np.maximum(values, 0))
    with pytest.raises(SegXAIInputError, match="postprocessing"):
        postprocess(values, "log")


def test_paper_000_normalisation_known_values():
    # median of (-2, -1, 0.5, 3) is -0.25: shifted (0, 0, 0.75, 3.25) / 3.25
    values = np.array([[[[-2.0, -1.0], [0.5, 3.0]]]], dtype=np.float32)
    np.testing.assert_allclose(normalise_000(values)[0].ravel(), [0, 0, 0.75 / 3.25, 1.0], rtol=1e-6)


def test_normalisation_is_per_channel_in_unit_range_and_handles_constants():
    rng = np.random.default_rng(0)
    values = np.stack([rng.normal(size=(4, 5, 6)) * 10, np.full((4, 5, 6), 3.0)]).astype(np.float32)
    result = normalise_000(values)
    assert result[0].max() == pytest.approx(1.0) and result[0].min() == 0.0
    assert np.mean(result[0] == 0) >= 0.5  # everything at or below the median
    np.testing.assert_array_equal(result[1], 0.0)
