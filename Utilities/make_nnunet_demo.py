"""Build the small real nnU-Net v2 model shipped in ``Resources/Models/nnunet_demo``.

nnU-Net's own pipeline end to end, on the CPU, in a few minutes: a handful of synthetic
phantom cases (a bright sphere with a brighter core in noisy tissue, inside a zero border so
that nnU-Net's crop to the non-zero region has work to do; anisotropic 1 x 1 x 1.5 mm voxels),
nnU-Net's fingerprint extraction and planning, the plans shrunk to a tiny 3d_fullres U-Net
(patch 16 x 24 x 24, 3 stages of 4 / 8 / 16 features) so the weights stay small, nnU-Net's
preprocessing and two folds of ``nnUNetTrainer_5epochs`` (``device cpu``). The results folder
(``dataset.json``, ``plans.json``, ``fold_0`` and ``fold_1`` with ``checkpoint_final.pth``)
and its model card (a one-line card completed from the folder) are written to the output folder.

Needs ``nnunetv2`` (``pip install 'SegXAILib[nnunet]'``). Usage::

    OMP_NUM_THREADS=1 python Utilities/make_nnunet_demo.py [--out Resources/Models/nnunet_demo]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

DATASET_ID = 987
DATASET_NAME = f"Dataset{DATASET_ID:03d}_SegXAIPhantom"
CONFIGURATION = "3d_fullres"
TRAINER = "nnUNetTrainer_5epochs"
FOLDS = (0, 1)
SHAPE_XYZ = (40, 40, 28)  # voxels, SimpleITK (x, y, z) order
SPACING_XYZ = (1.0, 1.0, 1.5)  # mm
BORDER = 4  # zero voxels around the tissue: nnU-Net crops them away


def _phantom(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One case as SimpleITK-ordered arrays ``(z, y, x)``: the image (float32) and labels (uint8:
    0 background, 1 sphere, 2 core)."""
    shape_zyx = SHAPE_XYZ[::-1]
    spacing_zyx = np.array(SPACING_XYZ[::-1])
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape_zyx], indexing="ij"), axis=-1) * spacing_zyx
    inner = tuple(slice(BORDER, s - BORDER) for s in shape_zyx)
    low = np.array([BORDER + 7] * 3) * spacing_zyx
    high = (np.array(shape_zyx) - BORDER - 8) * spacing_zyx
    centre = rng.uniform(low, high)
    radius = rng.uniform(5.0, 8.0)
    distance = np.linalg.norm(grid - centre, axis=-1)
    labels = np.zeros(shape_zyx, np.uint8)
    labels[distance <= radius] = 1
    labels[distance <= radius * 0.5] = 2
    image = np.zeros(shape_zyx, np.float32)
    tissue = 100.0 + 10.0 * rng.standard_normal(shape_zyx)
    tissue += 60.0 * (labels >= 1) + 50.0 * (labels == 2)
    image[inner] = tissue[inner]
    outside = np.ones(shape_zyx, bool)
    outside[inner] = False
    labels[outside] = 0
    return image.astype(np.float32), labels


def _write_raw(raw: Path, cases: int, seed: int) -> None:
    import SimpleITK as sitk

    folder = raw / DATASET_NAME
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    rng = np.random.default_rng(seed)
    for index in range(cases):
        image, labels = _phantom(rng)
        for array, path in ((image, folder / "imagesTr" / f"phantom_{index:03d}_0000.nii.gz"),
                            (labels, folder / "labelsTr" / f"phantom_{index:03d}.nii.gz")):
            itk = sitk.GetImageFromArray(array)
            itk.SetSpacing(SPACING_XYZ)
            sitk.WriteImage(itk, str(path))
    dataset = {
        "channel_names": {"0": "MR"},
        "labels": {"background": 0, "sphere": 1, "core": 2},
        "numTraining": cases,
        "file_ending": ".nii.gz",
        "name": "SegXAIPhantom",
        "description": "Synthetic spheres for SegXAI's nnU-Net tests (Utilities/make_nnunet_demo.py)",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))


def _shrink_plans(plans_file: Path) -> None:
    """A tiny 3d_fullres U-Net: small patch, 3 stages of few features, one conv per stage."""
    plans = json.loads(plans_file.read_text())
    config = plans["configurations"][CONFIGURATION]
    config["patch_size"] = [16, 24, 24]
    config["batch_size"] = 2
    arch = config["architecture"]["arch_kwargs"]
    arch.update(
        n_stages=3,
        features_per_stage=[4, 8, 16],
        kernel_sizes=[[3, 3, 3]] * 3,
        strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]],
        n_conv_per_stage=[1, 1, 1],
        n_conv_per_stage_decoder=[1, 1],
    )
    for other in [name for name in plans["configurations"] if name != CONFIGURATION]:
        del plans["configurations"][other]  # only 3d_fullres is preprocessed and trained
    plans_file.write_text(json.dumps(plans, indent=2))


def build(out: Path, cases: int = 6, seed: int = 0) -> Path:
    """Plan, preprocess and train in a temporary nnU-Net tree; copy the results folder to ``out``."""
    work = Path(tempfile.mkdtemp(prefix="segxai-nnunet-"))
    for name in ("raw", "preprocessed", "results"):
        (work / name).mkdir()
    # nnU-Net reads its folders from the environment when imported
    os.environ.update(nnUNet_raw=str(work / "raw"), nnUNet_preprocessed=str(work / "preprocessed"),
                      nnUNet_results=str(work / "results"), nnUNet_n_proc_DA="1", nnUNet_compile="false")
    import torch

    torch.manual_seed(seed)
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess
    # the trainer class directly (as nnUNetv2_train builds it): nnU-Net's search by name imports every trainer
    # module, some of which need timm / torchvision, which cannot sit beside a CPU-only torch
    from nnunetv2.training.nnUNetTrainer.variants.training_length import nnUNetTrainer_Xepochs

    _write_raw(work / "raw", cases, seed)
    extract_fingerprints([DATASET_ID], num_processes=1, check_dataset_integrity=True)
    plans_identifier = plan_experiments([DATASET_ID])
    _shrink_plans(work / "preprocessed" / DATASET_NAME / f"{plans_identifier}.json")
    preprocess([DATASET_ID], plans_identifier, configurations=(CONFIGURATION,), num_processes=(1,))
    os.environ["nnUNet_n_proc_DA"] = "0"  # augment in this process (planning needs >= 1: it sets torch threads)
    preprocessed = work / "preprocessed" / DATASET_NAME
    for fold in FOLDS:
        plans = json.loads((preprocessed / f"{plans_identifier}.json").read_text())
        plans["continue_training"] = False  # as nnU-Net's get_trainer_from_args sets it
        trainer = getattr(nnUNetTrainer_Xepochs, TRAINER)(
            plans=plans, configuration=CONFIGURATION,
            fold=fold, dataset_json=json.loads((preprocessed / "dataset.json").read_text()), device=torch.device("cpu"))
        trainer.run_training()
        trainer.perform_actual_validation(False)

    trained = work / "results" / DATASET_NAME / f"{TRAINER}__{plans_identifier}__{CONFIGURATION}"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for name in ("dataset.json", "plans.json"):
        shutil.copy2(trained / name, out / name)
    for fold in FOLDS:
        (out / f"fold_{fold}").mkdir()
        shutil.copy2(trained / f"fold_{fold}" / "checkpoint_final.pth", out / f"fold_{fold}" / "checkpoint_final.pth")
    card = {"name": "segxai-nnunet-demo", "architecture": {"format": "nnunetv2", "results_folder": ".",
                                                            "configuration": CONFIGURATION, "folds": list(FOLDS)},
            "version": "1",
            "description": f"nnU-Net v2 {TRAINER} on synthetic spheres (Utilities/make_nnunet_demo.py)"}
    (out / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    # the one-line card completed from the folder (channels, classes, patch, mirroring, trainer) and
    # written by ModelCard.save, as every shipped card: what loads is what is on disk
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's SegXAILib
    from SegXAILib.models.card import load_model_card

    load_model_card(out / "model_card.json").save(out / "model_card.json")
    shutil.rmtree(work)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "Resources/Models/nnunet_demo")
    parser.add_argument("--cases", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args()
    print(build(arguments.out, arguments.cases, arguments.seed))


if __name__ == "__main__":
    main()
