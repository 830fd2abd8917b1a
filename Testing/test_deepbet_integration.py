"""A real third-party model through our runtime: deepbet's TorchScript brain-extraction network
(shipped in the deepbet wheel, MIT) on the bundled real T1."""

from __future__ import annotations

import numpy as np
import pytest

deepbet = pytest.importorskip("deepbet", reason="deepbet is not installed (it is in the test extra)")

from SegXAILib.models import load_model, segment  # noqa: E402
from SegXAILib.models.third_party import deepbet_model_card  # noqa: E402
from SegXAILib.sample_data import load_sample_head  # noqa: E402
from SegXAILib.metrics import dice_score  # noqa: E402


@pytest.fixture(scope="module")
def brain_segmentation():
    head = load_sample_head()
    model = load_model(deepbet_model_card(), device="cpu")
    return head, segment(head.t1, model)


def test_deepbet_matches_the_reference_brain_mask(brain_segmentation):
    head, result = brain_segmentation
    assert result.labels.same_grid(head.t1)
    # the ITK example's skull-stripped mask is an independent reference
    assert dice_score(result.mask(1), head.brain.array[0] > 0) > 0.93


def test_deepbet_agrees_with_its_own_pipeline(brain_segmentation):
    """deepbet's own run (nibabel canonical orientation, its own resizing) vs. ours."""
    import nibabel as nib
    from deepbet.bet import BrainExtraction

    from SegXAILib.sample_data import resources_dir

    head, result = brain_segmentation
    path = resources_dir() / "Data" / "SampleT1" / "KmeansTest_T1UCharRaw.nii.gz"
    _, mask, _ = BrainExtraction(no_gpu=True).run(nib.load(str(path)))
    theirs = np.asarray(mask.dataobj) > 0
    # nibabel and SimpleITK both index the file's voxels (i, j, k): same array order
    assert theirs.shape == head.t1.spatial_shape
    assert dice_score(result.mask(1), theirs) > 0.95
