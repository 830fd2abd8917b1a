"""The browser viewer (``segxai view``): Slicer's views in a browser through trame-slicer,
computing in the engine process (:mod:`.app`), behind an access token (:mod:`.security`).

Needs the ``viewer`` extra (``pip install 'SegXAILib[viewer]'``); importing this package does
not import trame.
"""

__all__ = ["ViewerApp", "new_token", "token_middleware"]


def __getattr__(name):
    if name == "ViewerApp":
        from .app import ViewerApp

        return ViewerApp
    if name in ("new_token", "token_middleware"):
        from . import security

        return getattr(security, name)
    raise AttributeError(name)
