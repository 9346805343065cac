"""center-embed: image embeddings with center loss, shipped as ONNX.

Importing the package is cheap: torch is imported only when a torch-backed name
(`CenterLoss`, `EmbeddingNet`) is first used, so `center-embed --help` is instant and
the serving path never needs torch.
"""

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "CenterLoss": "center_embed.center_loss",
    "EmbeddingNet": "center_embed.model",
}

__all__ = ["CenterLoss", "EmbeddingNet", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'center_embed' has no attribute {name!r}")
