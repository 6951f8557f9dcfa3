"""The versions a saved file records beside what it holds (saved files describe themselves)."""

from __future__ import annotations

__version__ = "0.1.0"


def versions() -> dict[str, str]:
    """Versions of nas_kd and the libraries whose behaviour its outputs depend on."""
    from importlib.metadata import version

    import optuna
    import ptflops  # noqa: F401
    import torch
    import torchvision

    return {"nas_kd": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "optuna": optuna.__version__, "ptflops": version("ptflops")}
