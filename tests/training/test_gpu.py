"""On a CUDA device: the center loss never waits for the GPU, agrees with the CPU, a short
training run finishes, and bf16 + channels_last agrees with fp32.

Marked `gpu` (deselected by the default run) and skipped where CUDA is absent:

    pytest -m gpu tests/test_gpu.py
"""

from __future__ import annotations

import contextlib
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

from center_embed.training.center_loss import DENSE_MAX_CLASSES, CenterLoss
from center_embed.training.config import ModelConfig, load_config
from center_embed.training.model import EmbeddingNet
from tests.helpers import tiny_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

RULES = [("paper", {"alpha": 0.5}), ("mean", {"decay": 1.0}), ("mean", {"decay": 0.9}),
         ("sgd", {})]  # fmt: skip
DEVICE = torch.device("cuda")
# Class counts on either side of the dense/sparse threshold, and both paths forced.
SHAPES = [(10, "auto"), (DENSE_MAX_CLASSES + 1, "auto"), (10, "sparse"), (50_000, "dense")]


@contextlib.contextmanager
def sync_errors():
    """Any operation that makes the host wait for the device raises inside this block."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def batches(num_classes: int, dim: int, steps: int = 4, batch: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randn(batch, dim, generator=g) * 2 + 0.5
        # A quarter of the classes at most, so that some stay absent; duplicates galore.
        y = torch.randint(0, max(1, min(num_classes // 4, 64)), (batch,), generator=g)
        out.append((x, y * max(1, num_classes // 64)))
    return out


@pytest.mark.parametrize(("num_classes", "path"), SHAPES)
@pytest.mark.parametrize(("update", "options"), RULES)
def test_center_loss_step_never_syncs(num_classes, path, update, options):
    device = DEVICE
    criterion = CenterLoss(num_classes, 32, update, path=path, **options).to(device).train()
    data = [(x.to(device), y.to(device)) for x, y in batches(num_classes, 32)]
    x0, y0 = data[0]
    criterion(x0.requires_grad_(), y0).backward()  # first call: lazy CUDA initialisation
    with sync_errors():
        for x, y in data[1:]:
            x = x.requires_grad_()
            loss = criterion(x, y)
            loss.backward()
    assert torch.isfinite(loss).item()


@pytest.mark.parametrize(("num_classes", "path"), SHAPES)
@pytest.mark.parametrize(("update", "options"), RULES)
def test_center_loss_on_cuda_equals_cpu(num_classes, path, update, options):
    modules = {}
    for device in ("cpu", DEVICE.type):
        torch.manual_seed(0)  # the same random start for the sgd centers
        modules[device] = CenterLoss(num_classes, 32, update, path=path, **options).to(device)
    losses = {"cpu": [], DEVICE.type: []}
    grads = {"cpu": [], DEVICE.type: []}
    for x, y in batches(num_classes, 32):
        for device, criterion in modules.items():
            xd = x.to(device).requires_grad_()
            loss = criterion.train()(xd, y.to(device))
            loss.backward()
            losses[device].append(loss.detach().cpu())
            grads[device].append(xd.grad.cpu())
    close = dict(atol=1e-5, rtol=1e-5)
    for got in (losses, grads):
        torch.testing.assert_close(torch.stack(got[DEVICE.type]), torch.stack(got["cpu"]), **close)
    for name in ("centers", "counts", "sums"):
        cpu, cuda = getattr(modules["cpu"], name), getattr(modules[DEVICE.type], name)
        torch.testing.assert_close(cuda.detach().cpu(), cpu.detach(), **close, msg=name)
    if update == "sgd":
        torch.testing.assert_close(
            modules[DEVICE.type].centers.grad.cpu(), modules["cpu"].centers.grad, **close
        )


def test_training_step_without_the_loader_never_syncs():
    """Model forward in bf16 autocast, CE + λ·center, backward, Nesterov SGD: no host sync.
    (The data loader is left out: BatchLoader copies its augmentation grid from the CPU.)"""
    from center_embed.training.train import Lookahead, make_optimizer

    cfg = load_config("gpu")
    device = DEVICE
    torch.manual_seed(0)
    model = EmbeddingNet(cfg.model, 10).to(device)
    images = torch.randn(512, 3, 32, 32, device=device)
    model.init_whitening(images)
    model = model.to(memory_format=torch.channels_last).train()
    criterion = CenterLoss(10, cfg.model.embedding_dim).to(device).train()
    optimizer = make_optimizer(model, criterion, cfg)
    # Lookahead(model, total_steps[, every]): `every` joined the signature when train.py
    # was split; either works here.
    every = {"every": 5} if "every" in inspect.signature(Lookahead).parameters else {}
    lookahead = Lookahead(model, 100, **every)
    x = images.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (512,), device=device)

    def step(i: int) -> torch.Tensor:
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * 0.5
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            e, logits = model(x)
        ce = F.cross_entropy(logits.float(), y, label_smoothing=0.2)
        loss = ce + 0.01 * criterion(e, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i % 5 == 0:
            lookahead.update(model, lookahead.decay(i))
        return loss.detach()

    step(5)  # first step: lazy initialisation, optimizer state
    with sync_errors():
        losses = [step(i) for i in range(1, 11)]
    assert torch.isfinite(torch.stack(losses)).all().item()


def test_tiny_training_run_on_cuda(tiny_folder, tmp_path):
    from center_embed.training.checkpoint import build_model, load_checkpoint
    from center_embed.training.train import train

    cfg = tiny_config(tiny_folder, train__device=DEVICE.type)
    result = train(cfg, tmp_path, log=lambda _: None)
    last = result["history"][-1]
    assert math.isfinite(last["train_ce"]) and math.isfinite(last["train_center"])
    assert result["val"]["nearest_center_accuracy"] >= 0.9  # three easy classes
    # A checkpoint written on the GPU rebuilds on the CPU (what export and eval do).
    model, criterion, _ = build_model(load_checkpoint(tmp_path / "best.pt"))
    assert criterion.centers.device.type == "cpu"
    # And with plain torch.load, as docs/training.md promises: every tensor was saved on the CPU.
    raw = torch.load(tmp_path / "best.pt", weights_only=True)
    devices = {t.device.type for t in _tensors(raw)}
    assert devices == {"cpu"}
    assert torch.isfinite(model.embed(torch.zeros(2, 3, 32, 32))).all()


@pytest.mark.parametrize("widths", [[64, 256, 256], [128, 384, 384]])
def test_bf16_channels_last_forward_matches_fp32(widths):
    device = DEVICE
    torch.manual_seed(0)
    model = EmbeddingNet(ModelConfig(widths=widths), 10).to(device)
    images = torch.randn(256, 3, 32, 32, device=device)
    model.init_whitening(images)
    with torch.no_grad():
        model.train()(images)  # batch statistics into the running ones, then eval mode
        model.eval()
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # true fp32 convs
            e32, logits32 = model(images)
        fast = model.to(memory_format=torch.channels_last)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            e16, logits16 = fast(images.contiguous(memory_format=torch.channels_last))
    e16, logits16 = e16.float(), logits16.float()
    assert e16.dtype == torch.float32 and torch.isfinite(e16).all()
    # bf16 keeps 8 significant bits (relative step 2^-8); a dozen layers compound that.
    scale = e32.abs().max()
    assert (e16 - e32).abs().max() <= 0.05 * scale
    cosine = F.cosine_similarity(e16, e32, dim=1)
    assert cosine.min() >= 0.995, cosine.min()
    torch.testing.assert_close(logits16, logits32, atol=0.05 * logits32.abs().max(), rtol=0)


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _tensors(v)
