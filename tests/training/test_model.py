"""The network: the embedding's optional normalisation and what it guarantees."""

from __future__ import annotations

import pytest
import torch

from center_embed.training.config import ModelConfig
from center_embed.training.model import BatchRMSNorm, EmbeddingNet


def _net(norm: str) -> EmbeddingNet:
    torch.manual_seed(0)
    return EmbeddingNet(ModelConfig(widths=[8, 16, 16], embedding_dim=6, embedding_norm=norm), 3)


@pytest.mark.parametrize("norm", ["batchnorm", "rms"])
def test_normalised_embedding_keeps_its_scale_whatever_the_weights_scale(norm):
    net = _net(norm).train()
    x = torch.randn(64, 3, 32, 32)
    with torch.no_grad():
        net.embedding.weight.mul_(1e-3)  # what center loss alone would drive the weights to
        e = net.embed(x)
    if norm == "batchnorm":  # unit variance around a zero mean
        assert torch.allclose(e.mean(0), torch.zeros(6), atol=1e-4)
        assert torch.allclose(e.var(0, unbiased=False), torch.ones(6), atol=1e-2)
    else:  # unit second moment, the mean left where it was
        assert torch.allclose(e.pow(2).mean(0), torch.ones(6), atol=1e-4)
        assert e.mean(0).abs().max() > 0.05
    net.eval()  # inference uses the running statistics: a fixed map per dimension
    with torch.no_grad():
        one, batch = net.embed(x[:1]), net.embed(x)[:1]
    assert torch.allclose(one, batch, atol=1e-5)


def test_rms_norm_keeps_the_origin_and_tracks_the_second_moment():
    norm = BatchRMSNorm(2, momentum=0.5)
    x = torch.tensor([[3.0, 0.0], [-3.0, 4.0]])  # E[x²] = (9, 8)
    out = norm(x)
    assert torch.allclose(out, x / torch.tensor([3.0, 8**0.5]))
    assert torch.allclose(norm.running_square, torch.tensor([5.0, 4.5]))  # halfway from 1
    norm.eval()
    assert torch.equal(norm(torch.zeros(1, 2)), torch.zeros(1, 2))  # a zero stays zero
    assert torch.allclose(norm(x), x / norm.running_square.sqrt())


def test_no_norm_is_the_plain_linear_embedding_of_older_checkpoints():
    net = _net("none").eval()
    assert not any(k.startswith("embedding_norm.") for k in net.state_dict())
    assert "embedding_norm.running_mean" in _net("batchnorm").state_dict()
    assert "embedding_norm.running_square" in _net("rms").state_dict()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        pooled = torch.amax(net.groups(torch.nn.functional.gelu(net.whiten(x))), dim=(2, 3))
        assert torch.allclose(net.embed(x), net.embedding(pooled))
