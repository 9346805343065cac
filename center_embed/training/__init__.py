"""Training: everything that needs torch (the data loader on the device, the model, the center
loss, the loop, several processes, checkpoints, evaluation in torch).

Nothing outside this package, `center_embed.export` and the CLI's training commands imports
torch: a serving install (`.[cpu,serve]`) never has it. The package itself imports lazily,
so `center_embed.training.config` stays cheap for the CLI's argument parsing.
"""

from typing import Any

_LAZY = {
    "CenterLoss": "center_embed.training.center_loss",
    "EmbeddingNet": "center_embed.training.model",
}

__all__ = ["CenterLoss", "EmbeddingNet"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'center_embed.training' has no attribute {name!r}")
