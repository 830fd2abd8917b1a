"""SegXAIInstaller: the Python packages SegXAI needs inside 3D Slicer, and their installation.

The list is SegXAILib's own dependency list (``[project] dependencies`` of ``pyproject.toml``),
never a copy kept here: read from the ``pyproject.toml`` beside the imported ``SegXAILib``
package (the checkout's root, or the file the extension installs next to the package), else
from the installed distribution's metadata (``importlib.metadata.requires("SegXAILib")``).
PyTorch is installed through the PyTorch extension (``PyTorchUtils``, which picks the CUDA
build) and an installed torch is checked against SegXAILib's requirement; Slicer's own numpy,
SimpleITK, vtk and scipy are never installed or replaced (pinned to the installed versions).
The others go through ``slicer.packaging.pip_ensure`` (Slicer 5.12 and later: its own
confirmation and progress dialog), else ``slicer.util.pip_install`` under a progress dialog.

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
SLICER_OWNED = ("numpy", "SimpleITK", "vtk", "scipy")
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


def torchProblem() -> str:
    """Why the installed torch cannot be used (its version outside SegXAILib's requirement);
    empty when it can, or when torch is not installed (:func:`missingRequirements` says so)."""
    if importlib.util.find_spec("torch") is None:
        return ""
    requirement = torchRequirement()
    specifier = requirement[len(requirementName(requirement)):].strip()
    if not specifier:
        return ""
    try:
        installed = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return ""
    try:
        from packaging.specifiers import SpecifierSet
        from packaging.version import Version
    except ImportError:  # without packaging the version cannot be compared: trust it
        return ""
    # a local build tag (2.4.1+cu121) satisfies what its public version satisfies
    if Version(installed.split("+", 1)[0]) in SpecifierSet(specifier):
        return ""
    return (f"PyTorch {installed} is installed; SegXAI needs {requirement}. Press Install dependencies to update it "
            "(through the PyTorch extension), then restart Slicer.")


def _slicerPins() -> list:
    """``name==version`` of the installed Slicer-owned packages (pip constraints)."""
    pins = []
    for package in SLICER_OWNED:
        try:
            pins.append(f"{package}=={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return pins


def constraintsFile(folder: str) -> str:
    """A pip constraints file in ``folder`` pinning :data:`SLICER_OWNED` to the installed versions."""
    path = os.path.join(folder, "SegXAI-constraints.txt")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(_slicerPins()) + "\n")
    return path


def _installTorch(requirement: str, confirm: bool) -> bool:
    """PyTorch through the PyTorch extension (it picks the CUDA build for the GPU driver); plain
    pip when the extension is not installed. False when the user declined."""
    import slicer

    specifier = requirement[len(requirementName(requirement)):].strip() or None
    try:
        import PyTorchUtils
    except ImportError:
        if confirm and not slicer.util.confirmOkCancelDisplay(
                "SegXAI needs PyTorch. Install the build pip chooses now? (The PyTorch extension, from the "
                "Extensions Manager, picks the CUDA build that matches the GPU driver.)"):
            return False
        _withProgress("Installing PyTorch", lambda: slicer.util.pip_install([requirement]))
        return True
    installed = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=confirm,
                                                              torchVersionRequirement=specifier)
    return installed is not None


def _withProgress(label: str, action) -> None:
    """Run ``action()`` (a blocking pip run) under a busy progress dialog."""
    import qt
    import slicer

    dialog = slicer.util.createProgressDialog(labelText=f"{label}... (this can take minutes)", maximum=0)
    slicer.app.processEvents()
    try:
        with slicer.util.WaitCursor():
            action()
    finally:
        dialog.close()
        qt.QApplication.processEvents()


def ensureDependencies(confirm: bool = True) -> bool:
    """Install what is missing, on the main thread, after the user confirms.

    PyTorch (missing, or outside SegXAILib's requirement) through the PyTorch extension's
    ``PyTorchUtils`` when present (else pip); the others with ``slicer.packaging.pip_ensure``
    on Slicer 5.12 and later (its confirmation and progress dialog), else
    ``slicer.util.pip_install`` under a progress dialog; Slicer's numpy, SimpleITK, vtk and
    scipy pinned to the installed versions. Returns True when everything is importable; False
    when the user declined or something is still missing.
    """
    missing = missingRequirements()
    torch = torchRequirement()
    if not missing and not torchProblem():
        return True
    import slicer

    if torch in missing or torchProblem():
        if not _installTorch(torch, confirm):
            return False
    others = [requirement for requirement in missing if requirement != torch]
    if others:
        constraints = constraintsFile(slicer.app.temporaryPath)
        try:
            import slicer.packaging as packaging  # Slicer 5.12 and later
        except ImportError:
            packaging = None
        if packaging is not None:
            try:
                packaging.pip_ensure(others, constraints=constraints, prompt_install=confirm, requester="SegXAI")
            except RuntimeError as error:  # "User declined package installation"
                if "declined" not in str(error):
                    raise
                return False
        else:
            if confirm and not slicer.util.confirmOkCancelDisplay(
                    "SegXAI needs these Python packages: " + ", ".join(others) + ". Install them now?"):
                return False
            _withProgress("Installing " + ", ".join(requirementName(r) for r in others),
                          lambda: slicer.util.pip_install(others + ["-c", constraints]))
    importlib.invalidate_caches()
    return not missingRequirements() and not torchProblem()
