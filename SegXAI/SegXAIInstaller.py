"""SegXAIInstaller: the Python packages SegXAI needs inside 3D Slicer, and their installation.

The list is SegXAILib's own dependency list (``[project] dependencies`` of ``pyproject.toml``),
never a copy kept here: read from the ``pyproject.toml`` beside the imported ``SegXAILib``
package (the checkout's root, or the file the extension installs next to the package), else
from the installed distribution's metadata (``importlib.metadata.requires("SegXAILib")``).
PyTorch is installed through the PyTorch extension (``PyTorchUtils``, which picks the CUDA
build); Slicer's own numpy, SimpleITK and vtk are never installed or replaced (pinned to the
installed versions).

Qt-free except :func:`ensureDependencies`, which asks the user through ``slicer.util``.
"""

import importlib.metadata
import importlib.util
import os
import re
from typing import Optional

#: distributions installed through the PyTorch extension, not pip
TORCH = "torch"
#: distributions Slicer ships: never installed, and pinned so that no install replaces them
SLICER_OWNED = ("numpy", "SimpleITK", "vtk")
#: import names of the distributions whose import name is not their (normalised) name
IMPORT_NAMES = {"scikit-image": "skimage", "scikit-learn": "sklearn", "opencv-python-headless": "cv2",
                "pyyaml": "yaml", "pillow": "PIL"}

_NAME = re.compile(r"^\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)")


def normalisedName(name: str) -> str:
    """PEP 503 name: lower case, runs of ``-_.`` as one ``-`` (``SimpleITK`` -> ``simpleitk``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirementName(requirement: str) -> str:
    """The distribution name of a requirement string (``"scikit-image>=0.21"`` -> ``"scikit-image"``)."""
    match = _NAME.match(requirement)
    if match is None:
        raise ValueError(f"SegXAILib dependency {requirement!r}: not a requirement")
    return match.group(1)


def importName(requirement: str) -> str:
    """The module to import to check a requirement (``scikit-learn`` -> ``sklearn``)."""
    name = normalisedName(requirementName(requirement))
    return IMPORT_NAMES.get(name, name.replace("-", "_"))


def pyprojectPath() -> Optional[str]:
    """The ``pyproject.toml`` beside the ``SegXAILib`` package found on ``sys.path`` (None when
    there is none). Found without importing SegXAILib, whose imports need the dependencies."""
    spec = importlib.util.find_spec("SegXAILib")
    if spec is None or not spec.origin:
        return None
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(spec.origin))), "pyproject.toml")
    return path if os.path.isfile(path) else None


def applies(requirement: str) -> bool:
    """Whether a requirement's environment marker holds here (``; extra == "test"`` never does:
    extras are not run-time requirements)."""
    if ";" not in requirement:
        return True
    marker = requirement.split(";", 1)[1].strip()
    try:
        from packaging.markers import Marker
    except ImportError:  # without packaging: keep what is not an extra
        return "extra" not in marker
    return Marker(marker).evaluate({"extra": ""})


def _pyprojectDependencies(path: str) -> Optional[list]:
    """``[project] dependencies`` of ``path``, or None when it is not SegXAILib's."""
    try:
        import tomllib
    except ImportError:  # Python < 3.11
        import tomli as tomllib
    with open(path, "rb") as handle:
        project = tomllib.load(handle).get("project", {})
    if normalisedName(str(project.get("name", ""))) != "segxailib":
        return None  # a pyproject.toml of something else (e.g. one left in site-packages)
    return [str(requirement) for requirement in project.get("dependencies", [])]


def dependencies() -> list:
    """SegXAILib's run-time requirements here (torch and Slicer's packages included; those whose
    environment marker does not hold left out), as written in its package metadata.

    The ``pyproject.toml`` beside the imported package comes first: it describes the code that
    actually runs, where an installed distribution's metadata may be that of an older install.
    """
    path = pyprojectPath()
    found = _pyprojectDependencies(path) if path is not None else None
    if found is None:
        try:
            found = importlib.metadata.requires("SegXAILib")
        except importlib.metadata.PackageNotFoundError:
            found = None
    if found is None:
        raise RuntimeError("SegXAI: cannot find SegXAILib's dependency list: no pyproject.toml beside the SegXAILib "
                           "package and no installed SegXAILib distribution")
    return [requirement for requirement in found if applies(requirement)]


def pipRequirements() -> list:
    """The requirements to install with pip: :func:`dependencies` less torch and :data:`SLICER_OWNED`."""
    excluded = {normalisedName(name) for name in (TORCH, *SLICER_OWNED)}
    return [r for r in dependencies() if normalisedName(requirementName(r)) not in excluded]


def torchRequirement() -> str:
    """SegXAILib's torch requirement (``"torch>=2.1"``)."""
    for requirement in dependencies():
        if normalisedName(requirementName(requirement)) == TORCH:
            return requirement.split(";", 1)[0].strip()
    return TORCH


def missingRequirements() -> list:
    """The requirements (torch's first) whose module cannot be imported here."""
    missing = [r for r in pipRequirements() if importlib.util.find_spec(importName(r)) is None]
    if importlib.util.find_spec("torch") is None:
        missing.insert(0, torchRequirement())
    return missing


def _slicerPins() -> list:
    """``name==version`` of the installed Slicer-owned packages (pip constraints)."""
    pins = []
    for package in SLICER_OWNED:
        try:
            pins.append(f"{package}=={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return pins


def ensureDependencies(confirm: bool = True) -> bool:
    """Install what is missing, on the main thread, after the user confirms.

    PyTorch through the PyTorch extension's ``PyTorchUtils`` when present (else pip), the
    others with ``slicer.packaging.pip_ensure`` (else ``slicer.util.pip_install``), Slicer's
    numpy, SimpleITK and vtk pinned to the installed versions. Returns True when everything
    is importable.
    """
    missing = missingRequirements()
    if not missing:
        return True
    import slicer

    torch = torchRequirement()
    if torch in missing:
        try:
            import PyTorchUtils

            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            specifier = torch[len(requirementName(torch)):].strip() or None
            if torchLogic.installTorch(askConfirmation=confirm, torchVersionRequirement=specifier) is None:
                return False
        except ImportError:
            if confirm and not slicer.util.confirmOkCancelDisplay(
                    "SegXAI needs PyTorch. Install the CPU/CUDA build pip chooses now? (Installing the PyTorch "
                    "extension from the Extensions Manager picks the right CUDA build.)"):
                return False
            slicer.util.pip_install(torch)
        missing.remove(torch)
    if missing:
        constraints = os.path.join(slicer.app.temporaryPath, "SegXAI-constraints.txt")
        with open(constraints, "w", encoding="utf-8") as handle:
            handle.write("\n".join(_slicerPins()) + "\n")
        packaging = getattr(slicer, "packaging", None)
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            packaging.pip_ensure(missing, requester="SegXAI", constraints=constraints)
        else:
            if confirm and not slicer.util.confirmOkCancelDisplay(
                    "SegXAI needs these Python packages: " + ", ".join(missing) + ". Install them now?"):
                return False
            slicer.util.pip_install(missing + ["-c", constraints])
    return not missingRequirements()
