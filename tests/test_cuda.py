"""Pruning on a CUDA device: exact surgery, parameters that stay put, a training step.

Marker: cuda (these tests need a CUDA GPU and are skipped without one). They use the small
random-weight R18-FPN Faster R-CNN of tests/models.py, moved to the GPU; each takes a few
seconds there.
"""

import random

import pytest
import torch
from detectron2.utils.events import EventStorage

from d2prune import criteria
from d2prune.pruning import find_groups, prune
from d2prune.pruning.budget import Budget, select_channels

from . import models
from .exactness import silence

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

MODEL = "faster_rcnn_R18_FPN"
ALL_KINDS = ("stem", "block", "stage", "fpn", "head")


@pytest.fixture
def device():
    return torch.device("cuda")


@pytest.fixture(autouse=True)
def _no_tf32():
    """Full fp32 convolutions and matmuls: TF32 (on by default for cuDNN) rounds inputs to 10
    mantissa bits, so two networks that compute the same function would differ by ~1e-3."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _half_of_every_group(model, groups):
    """l1 keep sets removing half of every group's channels (down to 1)."""
    scores = criteria.build("l1").score(model, groups)
    return select_channels(groups, scores, Budget("channels", 0.5, kinds=ALL_KINDS, min_channels=1))


def _backbone(model, image):
    with torch.no_grad():
        return {k: v.double().cpu() for k, v in model.backbone(image).items()}


def _assert_close(before, after, tolerance, what):
    assert before.keys() == after.keys()
    for key, a in before.items():
        b = after[key]
        assert a.shape == b.shape, f"{what} {key}: {tuple(a.shape)} vs {tuple(b.shape)}"
        scale = a.abs().max().clamp(min=1)
        diff = (a - b).abs().max()
        assert diff <= tolerance * scale, f"{what} {key}: differs by {diff:.3g} (scale {scale:.3g})"


# fp64 leaves nothing but rounding far below 1e-5; fp32 gets the CPU tests' tolerance, since
# cuDNN may pick another algorithm (another summation order) for the narrower layers.
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-5), (torch.float32, 1e-4)], ids=["fp64", "fp32"])
def test_block_pruning_is_exact_on_cuda(device, dtype, tolerance):
    model = models.build(MODEL).to(device=device, dtype=dtype).eval()
    groups = [g for g in find_groups(model) if g.kind == "block"]
    assert groups
    rng = random.Random(0)
    keep = {}
    for group in groups:
        removed = sorted(rng.sample(range(group.size), group.size // 2))
        silence(model, group, removed)
        keep[group.name] = sorted(set(range(group.size)) - set(removed))
    image = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    before = _backbone(model, image)

    prune(model, keep)

    sizes = {g.name: g.size for g in find_groups(model)}
    assert all(sizes[name] == len(kept) for name, kept in keep.items())
    # Removing channels whose producers write zeros changes nothing but the order of sums.
    _assert_close(before, _backbone(model, image), tolerance, "zeroed then pruned, on cuda")
    # The pruned model computes on the GPU what it computes on the CPU.
    on_cpu = _backbone(model.cpu(), image.cpu())
    _assert_close(on_cpu, _backbone(model.to(device), image), tolerance, "pruned, cpu vs cuda")
    # The whole detector runs on the GPU after pruning (in fp32: detectron2's NMS takes no fp64).
    with torch.no_grad():
        outputs = model.float()(models.images(1))
    assert outputs[0]["instances"].pred_boxes.tensor.device.type == device.type


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_pruned_parameters_stay_on_cuda(device, dtype):
    model = models.build(MODEL).to(device=device, dtype=dtype)
    params = {n: (p.device, p.dtype, p.requires_grad) for n, p in model.named_parameters()}
    buffers = {n: (b.device, b.dtype) for n, b in model.named_buffers()}
    assert any(not p.requires_grad for p in model.parameters())  # FREEZE_AT: stem and res2 frozen
    groups = find_groups(model)
    keep = _half_of_every_group(model, groups)
    assert {g.kind for g in groups if g.name in keep} == {g.kind for g in groups}

    prune(model, keep)

    after = {n: (p.device, p.dtype, p.requires_grad) for n, p in model.named_parameters()}
    assert after == params
    assert {n: (b.device, b.dtype) for n, b in model.named_buffers()} == buffers
    sizes = {g.name: g.size for g in find_groups(model)}
    assert all(sizes[name] == len(kept) for name, kept in keep.items())


def test_training_step_on_cuda_after_pruning(device):
    model = models.build(MODEL).to(device)
    prune(model, _half_of_every_group(model, find_groups(model)))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=1e-3, momentum=0.9)
    before = [p.detach().clone() for p in trainable]

    model.train()
    with EventStorage():
        for _ in range(2):
            losses = model(models.with_targets(models.images(2)))
            total = sum(losses.values())
            assert total.device.type == device.type and torch.isfinite(total), losses
            optimizer.zero_grad()
            total.backward()
            for param in trainable:
                assert param.grad is not None and param.grad.device.type == device.type
                assert param.grad.shape == param.shape
            optimizer.step()
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, trainable))
    model.eval()
    with torch.no_grad():
        assert len(model(models.images(1))) == 1
