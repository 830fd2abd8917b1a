"""nnU-Net v2 results folders as models: the card, the networks, nnU-Net's own preprocessing and its inverse.

A results folder (``dataset.json``, ``plans.json``, ``fold_X/checkpoint_final.pth``) is a model
card of format ``nnunetv2``; :func:`nnunet_card_data` completes a one-line card (or a bare
folder given to :func:`~SegXAILib.models.card.load_model_card`) from the folder: input channels
from ``dataset.json``'s ``channel_names``, classes from its ``labels`` (region-based models give
sigmoid outputs, one per region), the patch size from the plans, the mirroring axes and trainer
from the first fold's checkpoint, nnU-Net's window scheme (tile step 0.5, Gaussian weights).

Checkpoints are pickles: they are read with ``torch.load(weights_only=True)`` and an allow-list
of the globals a checkpoint written by nnU-Net's trainer holds (numpy scalars and dtypes in its
logging); anything else loads only with ``trust_code=True``. So do plans naming a network class
outside ``dynamic_network_architectures`` or building blocks outside ``torch.nn`` (nnU-Net
imports them by name).

Geometry: nnU-Net works on SimpleITK arrays ``(z, y, x)`` with their spacing and ignores the
direction. An :class:`~SegXAILib.image.Image` ``(C, I, J, K)`` is that array transposed
(:meth:`Image.to_sitk` writes ``array[c].transpose(2, 1, 0)``), so the network sees the voxels
in the order nnU-Net would have read them from the same file. nnU-Net's preprocessing
(transpose, crop to the non-zero region, resampling with scikit-image's half-voxel convention)
maps model-grid indices to input indices by an affine map, so the model grid has an exact
IJK-to-RAS matrix (:class:`NNUNetModelGrid`), and results map back the way nnU-Net maps its
probabilities back (its resampling function, then the crop reverted, then the transpose).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..image import Image, SegXAIInputError

__all__ = ["nnunet_available", "require_nnunet", "is_results_folder", "nnunet_card_data", "read_checkpoint",
           "safe_checkpoint_globals", "load_nnunet_networks", "NNUNetModelGrid", "nnunet_model_input",
           "nnunet_to_input_grid", "nnunet_logits_to_probabilities", "nnunet_summary_lines"]

#: colours given to the classes of a card built from a results folder (background black)
_PALETTE = [(0, 0, 0), (230, 70, 50), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]
DEFAULT_CHECKPOINT = "checkpoint_final.pth"
#: nnU-Net v2's tile step (``nnUNetPredictor(tile_step_size=0.5)``): overlap ``1 - 0.5``
NNUNET_TILE_STEP = 0.5


def nnunet_available() -> bool:
    """Whether ``nnunetv2`` can be imported."""
    try:
        import nnunetv2  # noqa: F401
    except ImportError:
        return False
    return True


def require_nnunet(what: str) -> None:
    """An error naming ``what`` unless ``nnunetv2`` is importable."""
    if not nnunet_available():
        raise SegXAIInputError(f"{what}: nnU-Net v2 models need the nnunetv2 package "
                               "(make install sets it up beside the pinned CPU torch; see the Makefile)")


def is_results_folder(path: str | Path) -> bool:
    """Whether ``path`` is an nnU-Net v2 results folder (``dataset.json`` and ``plans.json``)."""
    path = Path(path)
    return path.is_dir() and (path / "dataset.json").is_file() and (path / "plans.json").is_file()


# ---- checkpoints ---------------------------------------------------------------------------------
def safe_checkpoint_globals() -> list[Any]:
    """The globals a checkpoint of nnU-Net's trainer holds besides tensors and containers.

    Its ``logging`` and ``_best_ema`` hold numpy scalars (pickled as
    ``numpy._core.multiarray.scalar`` with a ``numpy.dtype`` and the dtype's class); numpy's
    scalar reconstructor builds a number from bytes and runs no other code.
    """
    import numpy.dtypes

    allowed: list[Any] = [np.dtype]
    allowed += [getattr(numpy.dtypes, name) for name in dir(numpy.dtypes)
                if name.endswith("DType") and isinstance(getattr(numpy.dtypes, name), type)]
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):  # numpy 2 / numpy 1 spelling
        try:
            scalar = getattr(__import__(module, fromlist=["scalar"]), "scalar")
        except (ImportError, AttributeError):
            continue
        # numpy 2 keeps numpy.core as an alias: allow the reconstructor under both names
        allowed.append((scalar, f"{module}.scalar"))
    return allowed


def _global_name(value: Any) -> str:
    """``module.qualname`` of an allow-listed global, with numpy's ``_core`` spelled ``core``."""
    if isinstance(value, tuple):  # (object, "module.name") pairs of torch's safe_globals
        return str(value[1]).replace("numpy._core", "numpy.core")
    name = f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', getattr(value, '__name__', ''))}"
    return name.replace("numpy._core", "numpy.core")


def read_checkpoint(path: Path, trust_code: bool = False) -> dict[str, Any]:
    """An nnU-Net checkpoint (a pickled dict) read with ``weights_only=True`` and the allow-list
    :func:`safe_checkpoint_globals`; with ``trust_code`` anything else too (a full unpickling).

    Raises
    ------
    SegXAIInputError
        No such file; the file holds other objects and ``trust_code`` is off (naming them and
        why); not a checkpoint.
    """
    if not path.is_file():
        raise SegXAIInputError(f"nnU-Net checkpoint {path}: no such file")
    try:
        with torch.serialization.safe_globals(safe_checkpoint_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not trust_code:
            try:
                allowed = {_global_name(g) for g in safe_checkpoint_globals()}
                names = [name for name in torch.serialization.get_unsafe_globals_in_checkpoint(path)
                         if name.replace("numpy._core", "numpy.core") not in allowed]
                unknown = ", ".join(names) or "unknown objects"
            except Exception:  # not a zip checkpoint: name the error instead
                unknown = " ".join(str(error).split())[:300]
            raise SegXAIInputError(
                f"nnU-Net checkpoint {path}: a checkpoint is a pickle, and this one holds Python objects beyond "
                f"the ones nnU-Net's trainer writes ({unknown}); unpickling them can run code, so load it only if "
                "you trust its source, with trust_code=True"
            ) from None
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)  # the user trusts this file
    except Exception as error:
        raise SegXAIInputError(f"nnU-Net checkpoint {path}: cannot be read ({error})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict):
        raise SegXAIInputError(f"nnU-Net checkpoint {path}: no 'network_weights' (not a checkpoint of nnU-Net v2)")
    return checkpoint


# ---- the card ------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise SegXAIInputError(f"nnU-Net results folder {path.parent}: no {path.name}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SegXAIInputError(f"{path}: not valid JSON ({error})") from None


def _managers(folder: Path, configuration: str):
    """nnU-Net's PlansManager, ConfigurationManager, dataset.json and LabelManager of a results folder."""
    require_nnunet(f"nnU-Net results folder {folder}")
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dataset = _read_json(folder / "dataset.json")
    plans_manager = PlansManager(_read_json(folder / "plans.json"))
    if configuration not in plans_manager.available_configurations:
        raise SegXAIInputError(f"configuration {configuration!r}: the plans in {folder} have "
                               f"{list(plans_manager.available_configurations)}")
    return plans_manager, plans_manager.get_configuration(configuration), dataset, plans_manager.get_label_manager(dataset)


def _detect_folds(folder: Path, checkpoint: str) -> list[int | str]:
    folds: list[int | str] = sorted(int(p.name[5:]) for p in folder.glob("fold_*")
                                    if p.name[5:].isdigit() and (p / checkpoint).is_file())
    if not folds and (folder / "fold_all" / checkpoint).is_file():
        folds = ["all"]
    if not folds:
        raise SegXAIInputError(f"nnU-Net results folder {folder}: no fold_X/{checkpoint}")
    return folds


def checkpoint_path(folder: Path, fold: int | str, checkpoint: str) -> Path:
    return folder / f"fold_{fold}" / checkpoint


def nnunet_card_data(data: dict[str, Any], card_path: Optional[Path]) -> dict[str, Any]:
    """A card's JSON completed from its nnU-Net results folder; keys the card gives are kept.

    Parameters
    ----------
    data : dict
        The card's JSON with ``architecture.format == "nnunetv2"`` and ``results_folder``
        (relative to the card). ``configuration`` defaults to the first fold's checkpoint's,
        ``folds`` to every ``fold_X`` holding ``checkpoint`` (default ``checkpoint_final.pth``).
    card_path : Path, optional
        The card file (its folder resolves ``results_folder``).

    Returns
    -------
    dict
        A full card: ``input_channels``, ``classes``, ``output_activation``, ``inference``
        (patch size, ``overlap`` 0.5, Gaussian blend, ``mirror_axes``, ``window_scheme``
        ``"nnunet"``), ``architecture.trainer`` and ``architecture.plans``.
    """
    data = json.loads(json.dumps(data))  # a copy: the caller's dict stays as given
    architecture = data["architecture"]
    relative = architecture.get("results_folder")
    if not isinstance(relative, str):
        return data  # the schema reports the missing / wrong field
    base = card_path.parent if card_path is not None else Path.cwd()
    folder = (base / relative).resolve()
    if not is_results_folder(folder):
        raise SegXAIInputError(f"results_folder {folder}: not an nnU-Net results folder (needs dataset.json and "
                               "plans.json)")
    checkpoint_name = architecture.setdefault("checkpoint", DEFAULT_CHECKPOINT)
    folds = architecture.setdefault("folds", _detect_folds(folder, checkpoint_name))
    inference = data.setdefault("inference", {})
    first: Optional[dict[str, Any]] = None
    if ("configuration" not in architecture or "trainer" not in architecture or "mirror_axes" not in inference) \
            and isinstance(folds, list) and folds:
        path = checkpoint_path(folder, folds[0], checkpoint_name)
        try:
            first = read_checkpoint(path)
        except SegXAIInputError as error:  # a card is read without trust: say how to do without
            raise SegXAIInputError(f"{error}. The model card is completed from that checkpoint; to load this model "
                                   "with trust_code, write a model_card.json giving architecture.configuration, "
                                   "architecture.trainer and inference.mirror_axes") from None
    if first is not None:
        architecture.setdefault("configuration", first.get("init_args", {}).get("configuration", "3d_fullres"))
        architecture.setdefault("trainer", str(first.get("trainer_name", "nnUNetTrainer")))
        axes = first.get("inference_allowed_mirroring_axes")
        inference.setdefault("mirror_axes", [int(a) for a in axes] if axes is not None else [])
    plans_manager, configuration, dataset, labels = _managers(folder, str(architecture["configuration"]))
    architecture.setdefault("plans", plans_manager.plans_name)
    if len(configuration.patch_size) != 3:
        raise SegXAIInputError(f"configuration {architecture['configuration']!r}: a {len(configuration.patch_size)}D "
                               "nnU-Net configuration; SegXAI runs 3D networks (use 3d_fullres or 3d_lowres)")
    channels = dataset.get("channel_names", dataset.get("modality", {}))
    data.setdefault("input_channels", [str(channels[key]) for key in sorted(channels, key=int)])
    ignore = labels.ignore_label
    names = [name for name, value in sorted(dataset["labels"].items(), key=lambda item: _first_value(item[1]))
             if value != ignore and name != "ignore"]
    # the palette repeats its colours after the background's
    data.setdefault("classes", [{"name": name, "color": list(_PALETTE[i if i < len(_PALETTE) else 1 + (i - 1) % (len(_PALETTE) - 1)])}
                                for i, name in enumerate(names)])
    # region-based training: one sigmoid output per region (the background has none)
    data.setdefault("output_activation", "sigmoid" if labels.has_regions else "softmax")
    inference.setdefault("patch_size", [int(p) for p in configuration.patch_size])
    inference.setdefault("overlap", 1.0 - NNUNET_TILE_STEP)
    inference.setdefault("blend", "gaussian")
    inference.setdefault("window_scheme", "nnunet")
    data.setdefault("name", f"{plans_manager.dataset_name}-{architecture['configuration']}")
    data.setdefault("provenance", {"nnunetv2": {"dataset": plans_manager.dataset_name, "plans": plans_manager.plans_name,
                                                "trainer": architecture.get("trainer")}})
    return data


def _first_value(value: Any) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def nnunet_summary_lines(card) -> list[str]:
    """``segxai info`` lines of an nnU-Net card: trainer, configuration, target spacing, patch, folds,
    mirroring axes, labels."""
    arch = card.architecture
    lines = [
        f"  nnU-Net      : trainer {arch.get('trainer', '?')}, plans {arch.get('plans', '?')}, "
        f"configuration {arch.get('configuration')}",
        f"  folds        : {list(arch.get('folds', []))} ({arch.get('checkpoint', DEFAULT_CHECKPOINT)}; logits averaged)",
        f"  labels       : {', '.join(f'{i}={name}' for i, name in enumerate(card.class_names))}",
    ]
    if not card.mirror_axes:
        lines.append("  mirroring    : none (inference.mirror_axes is empty)")
    try:
        _, configuration, _, _ = _managers(card.resolve(arch["results_folder"]), str(arch["configuration"]))
        lines.insert(1, f"  nnU-Net grid : spacing {[float(s) for s in configuration.spacing]} mm, "
                        f"normalisation {list(configuration.normalization_schemes)}")
    except SegXAIInputError:
        pass  # nnunetv2 missing: the card's own fields still show
    return lines


# ---- networks ------------------------------------------------------------------------------------
def _refuse_untrusted_plans(card, configuration, trust_code: bool) -> None:
    """nnU-Net imports the plans' network class and building blocks by name: outside
    ``dynamic_network_architectures`` / ``torch.nn`` that is running code the user must trust."""
    if trust_code:
        return
    name = str(configuration.network_arch_class_name)
    imports = {key: configuration.network_arch_init_kwargs.get(key)
               for key in configuration.network_arch_init_kwargs_req_import}
    unknown = [name] if not name.startswith("dynamic_network_architectures.") else []
    unknown += [str(v) for v in imports.values() if v is not None and not str(v).startswith("torch.nn.")]
    if unknown:
        raise SegXAIInputError(
            f"model card {card.path}: the nnU-Net plans name {', '.join(unknown)}, which nnU-Net imports and runs; "
            "only dynamic_network_architectures networks and torch.nn blocks load without trust; load it only if you "
            "trust its source, with trust_code=True"
        )


def load_nnunet_networks(card, trust_code: bool = False) -> list[torch.nn.Module]:
    """One network per fold of an ``nnunetv2`` card, built from the plans by nnU-Net's
    ``get_network_from_plans`` (as nnU-Net's trainer builds it), deep supervision off, each with
    its fold's ``network_weights``.

    Raises
    ------
    SegXAIInputError
        nnunetv2 missing; a checkpoint with unknown globals or plans importing code outside
        nnU-Net's network library without ``trust_code``; weights that do not fit the plans'
        network (a custom trainer building its own architecture).
    """
    arch = card.architecture
    folder = card.resolve(arch["results_folder"])
    plans_manager, configuration, dataset, labels = _managers(folder, str(arch["configuration"]))
    _refuse_untrusted_plans(card, configuration, trust_code)
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    in_channels = determine_num_input_channels(plans_manager, configuration, dataset)
    if in_channels != len(card.input_channels):
        raise SegXAIInputError(f"model card {card.path}: {len(card.input_channels)} input_channels, the nnU-Net model "
                               f"takes {in_channels} (a cascade stage's previous segmentation is not supported)")
    networks = []
    for fold in arch["folds"]:
        path = checkpoint_path(folder, fold, arch.get("checkpoint", DEFAULT_CHECKPOINT))
        checkpoint = read_checkpoint(path, trust_code)
        network = get_network_from_plans(
            configuration.network_arch_class_name, configuration.network_arch_init_kwargs,
            configuration.network_arch_init_kwargs_req_import, in_channels, labels.num_segmentation_heads,
            allow_init=True, deep_supervision=False,
        )
        # a checkpoint saved from a torch.compile'd network prefixes its keys
        state = {key.removeprefix("_orig_mod."): value for key, value in checkpoint["network_weights"].items()}
        try:
            network.load_state_dict(state)
        except RuntimeError as error:
            details = " ".join(str(error).split())[:300]
            raise SegXAIInputError(
                f"nnU-Net checkpoint {path}: its weights do not fit the plans' {configuration.network_arch_class_name} "
                f"(trainer {checkpoint.get('trainer_name')!r} may build its own architecture): {details}"
            ) from None
        networks.append(network.eval())
    return networks


# ---- preprocessing and its inverse ----------------------------------------------------------------
class NNUNetModelGrid(np.ndarray):
    """The model grid's IJK-to-RAS matrix ``(4, 4)`` that also carries what nnU-Net needs to map
    results back (its preprocessing properties and the card): :func:`to_input_grid` uses
    nnU-Net's inverse for it. Returned by :func:`nnunet_model_input`."""

    properties: dict[str, Any]
    card: Any

    def __new__(cls, matrix: np.ndarray, properties: dict[str, Any], card: Any) -> "NNUNetModelGrid":
        grid = np.asarray(matrix, dtype=float).view(cls)
        grid.properties = properties
        grid.card = card
        return grid

    def __array_finalize__(self, source: Any) -> None:
        self.properties = getattr(source, "properties", {})
        self.card = getattr(source, "card", None)


def _sitk_order(image: Image) -> tuple[np.ndarray, list[float]]:
    """The array ``(C, z, y, x)`` and spacing ``[z, y, x]`` nnU-Net would read from ``image``'s file."""
    return np.ascontiguousarray(image.array.transpose(0, 3, 2, 1)), [float(s) for s in image.spacing[::-1]]


def _model_to_input_index(properties: dict[str, Any], transpose_forward: Sequence[int], model_shape) -> np.ndarray:
    """``(4, 4)``: model-grid voxel index -> input voxel index ``(i, j, k)``.

    nnU-Net transposes the ``(z, y, x)`` array (axis ``t`` of the result is axis
    ``transpose_forward[t]``), crops ``bbox`` and resizes with scikit-image's convention
    ``source = (target + 0.5) * old / new - 0.5`` (also used by its separate-z path).
    """
    bbox = np.array(properties["bbox_used_for_cropping"], dtype=float)  # transposed axes, [start, stop)
    cropped = np.array(properties["shape_after_cropping_and_before_resampling"], dtype=float)
    scale = cropped / np.asarray(model_shape, dtype=float)
    resize = np.eye(4)
    resize[:3, :3] = np.diag(scale)
    resize[:3, 3] = 0.5 * scale - 0.5 + bbox[:, 0]  # into the transposed, uncropped array
    transpose = np.zeros((4, 4))
    transpose[3, 3] = 1
    for axis, source in enumerate(transpose_forward):
        transpose[source, axis] = 1  # transposed axis -> (z, y, x) axis
    to_ijk = np.zeros((4, 4))
    to_ijk[3, 3] = 1
    to_ijk[0, 2] = to_ijk[1, 1] = to_ijk[2, 0] = 1  # (z, y, x) -> (i, j, k)
    return to_ijk @ transpose @ resize


def nnunet_model_input(image: Image, card, device: torch.device | str = "cpu") -> tuple[torch.Tensor, NNUNetModelGrid]:
    """nnU-Net's own preprocessing of ``image`` (transpose, crop to the non-zero region,
    resampling to the plans' spacing, normalisation) by the plans' preprocessor class.

    Returns
    -------
    batch : torch.Tensor
        ``(1, C, D, H, W)`` float32 on ``device``: the network input, as nnUNetPredictor feeds it.
    grid : NNUNetModelGrid
        The model grid's IJK-to-RAS matrix, with nnU-Net's properties for mapping back.
    """
    card.check_input_count(image.num_channels, "channel(s)")
    arch = card.architecture
    plans_manager, configuration, dataset, _ = _managers(card.resolve(arch["results_folder"]), str(arch["configuration"]))
    data, spacing = _sitk_order(image)
    preprocessor = configuration.preprocessor_class(verbose=False)
    properties: dict[str, Any] = {"spacing": spacing}
    data, _, properties = preprocessor.run_case_npy(data, None, properties, plans_manager, configuration, dataset)
    index = _model_to_input_index(properties, plans_manager.transpose_forward, data.shape[1:])
    grid = NNUNetModelGrid(image.ijk_to_ras @ index, properties, card)
    batch = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None].to(device)
    return batch, grid


def _back_to_cropped(values: np.ndarray, grid: NNUNetModelGrid, nearest: bool) -> np.ndarray:
    """nnU-Net's resampling from the model grid back to the cropped, transposed input shape."""
    arch = grid.card.architecture
    plans_manager, configuration, _, _ = _managers(grid.card.resolve(arch["results_folder"]), str(arch["configuration"]))
    properties = grid.properties
    original = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    function = configuration.resampling_fn_seg if nearest else configuration.resampling_fn_probabilities
    resampled = function(np.asarray(values), properties["shape_after_cropping_and_before_resampling"],
                         configuration.spacing, original)
    return resampled.numpy() if isinstance(resampled, torch.Tensor) else np.asarray(resampled)


def _uncrop(values: np.ndarray, grid: NNUNetModelGrid, reference: Image, channel_names: tuple[str, ...],
            outside: Optional[Sequence[float]]) -> Image:
    """Revert nnU-Net's crop (``outside`` per channel elsewhere, 0 by default) and its transpose."""
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

    arch = grid.card.architecture
    plans_manager, _, _, _ = _managers(grid.card.resolve(arch["results_folder"]), str(arch["configuration"]))
    properties = grid.properties
    full = np.zeros((values.shape[0], *properties["shape_before_cropping"]), dtype=values.dtype)
    if outside is not None:
        full[:] = np.asarray(outside, dtype=values.dtype).reshape(-1, 1, 1, 1)
    full = insert_crop_into_image(full, values, properties["bbox_used_for_cropping"])
    zyx = full.transpose([0, *[i + 1 for i in plans_manager.transpose_backward]])
    return reference.with_array(np.ascontiguousarray(zyx.transpose(0, 3, 2, 1)), channel_names)


def nnunet_to_input_grid(values: np.ndarray, grid: NNUNetModelGrid, reference: Image,
                         channel_names: tuple[str, ...] = (), interpolation: str = "linear",
                         outside: Optional[Sequence[float]] = None) -> Image:
    """Per-voxel ``values`` ``(C, D, H, W)`` on nnU-Net's model grid onto ``reference``'s grid,
    as nnU-Net maps its predictions back: its resampling function (``"linear"``: the one for
    probabilities; ``"nearest"``: the one for segmentations), the crop reverted (``outside``
    per channel beyond it, default 0), the transpose reverted."""
    values = np.asarray(values)
    dtype = values.dtype
    nearest = interpolation == "nearest"
    resampled = _back_to_cropped(values.astype(np.float32 if not nearest else values.dtype, copy=False), grid, nearest)
    return _uncrop(resampled.astype(dtype, copy=False), grid, reference, channel_names, outside)


def nnunet_logits_to_probabilities(logits: np.ndarray, grid: NNUNetModelGrid, reference: Image, card) -> Image:
    """Model-grid logits ``(K', D, H, W)`` -> class probabilities ``(K, I, J, K)`` on ``reference``'s
    grid, as nnU-Net's ``convert_predicted_logits_to_segmentation_with_correct_shape``: logits
    resampled, then the activation, then the crop reverted (background probability 1 outside it)."""
    from .inference import activate

    resampled = _back_to_cropped(np.asarray(logits, dtype=np.float32), grid, nearest=False)
    probabilities = activate(torch.from_numpy(np.ascontiguousarray(resampled, dtype=np.float32))[None], card)[0].numpy()
    outside = [1.0] + [0.0] * (probabilities.shape[0] - 1)
    return _uncrop(probabilities, grid, reference, tuple(card.class_names), outside)
