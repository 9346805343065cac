"""center-embed: image embeddings with center loss, shipped as ONNX.

Importing the package is cheap and never loads torch: the torch side lives in
`center_embed.training` (`from center_embed.training import CenterLoss, EmbeddingNet`), so
`center-embed --help` is instant and a serving install never needs torch.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
