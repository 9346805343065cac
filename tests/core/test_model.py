"""The network: the embedding's optional batch normalisation and what it guarantees."""

from __future__ import annotations

import torch

from center_embed.config import ModelConfig
from center_embed.model import EmbeddingNet


def _net(norm: str) -> EmbeddingNet:
    torch.manual_seed(0)
    return EmbeddingNet(ModelConfig(widths=[8, 16, 16], embedding_dim=6, embedding_norm=norm), 3)


def test_batchnorm_embedding_has_unit_variance_whatever_the_weights_scale():
    net = _net("batchnorm").train()
    x = torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        net.embedding.weight.mul_(1e-3)  # what center loss alone would drive the weights to
        e = net.embed(x)
    assert torch.allclose(e.mean(0), torch.zeros(6), atol=1e-4)
    assert torch.allclose(e.var(0, unbiased=False), torch.ones(6), atol=1e-2)
    net.eval()  # inference uses the running statistics: a fixed affine map per dimension
    with torch.no_grad():
        one, batch = net.embed(x[:1]), net.embed(x)[:1]
    assert torch.allclose(one, batch, atol=1e-5)


def test_no_norm_is_the_plain_linear_embedding_of_older_checkpoints():
    net = _net("none").eval()
    assert "embedding_norm.running_mean" not in net.state_dict()
    assert "embedding_norm.running_mean" in _net("batchnorm").state_dict()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        pooled = torch.amax(net.groups(torch.nn.functional.gelu(net.whiten(x))), dim=(2, 3))
        assert torch.allclose(net.embed(x), net.embedding(pooled))
