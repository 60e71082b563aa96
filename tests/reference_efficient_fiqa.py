"""Efficient-FIQA's networks built the way its `models/FIQA_model.py` builds them, and scored the
way its `test.py` scores (PIL image → Resize(S) → CenterCrop(S) → ToTensor → Normalize(ImageNet)
→ model): the reference side of the import parity checks (tests/test_import.py and
benchmarks/import_parity.py). Written from reading that code; none of it is copied."""

from __future__ import annotations

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn
from torchvision import models as tv_models
from torchvision import transforms


class ReferenceEdgeNeXt(nn.Module):
    """FIQA_EdgeNeXt_XXS, as the reference builds it."""

    def __init__(self):
        super().__init__()
        model = timm.create_model("edgenext_xx_small", pretrained=False)
        model.head = nn.Identity()
        self.feature_extraction = model
        self.avg_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.quality = nn.Sequential(nn.Linear(168, 128), nn.Linear(128, 1))

    def forward(self, x):
        return self.quality(torch.flatten(self.avg_pool(self.feature_extraction(x)), 1))


class ReferenceSwinIQA(nn.Module):
    """Swin_b_IQA (torchvision swin with head = Identity + 1024→128→1), for any swin variant."""

    def __init__(self, variant: str = "swin_b"):
        super().__init__()
        model = getattr(tv_models, variant)()
        model.head = nn.Identity()
        self.feature_extraction = model
        width = model.norm.normalized_shape[0]
        self.quality = nn.Sequential(nn.Linear(width, 128), nn.Linear(128, 1))

    def forward(self, x):
        return self.quality(self.feature_extraction(x))


class ReferenceFIQASwin(nn.Module):
    """FIQA_Swin_B: a Swin_b_IQA whose own head is an identity, wrapped with a new head."""

    def __init__(self, variant: str = "swin_b"):
        super().__init__()
        inner = ReferenceSwinIQA(variant)
        inner.quality = nn.Identity()
        self.feature_extraction = inner
        width = inner.feature_extraction.norm.normalized_shape[0]
        self.quality = nn.Sequential(nn.Linear(width, 128), nn.Linear(128, 1))

    def forward(self, x):
        return self.quality(self.feature_extraction(x))


def reference_scores(model: nn.Module, paths, size: int) -> np.ndarray:
    transform = transforms.Compose([
        transforms.Resize(size), transforms.CenterCrop(size), transforms.ToTensor(),
        transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    model.eval()
    with torch.no_grad():
        return np.array([model(transform(Image.open(p).convert("RGB")).unsqueeze(0)).item() for p in paths])


def randomised(model: nn.Module, seed: int) -> nn.Module:
    """Random weights everywhere (norms and biases too), so no part of the network is left out."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.dtype.is_floating_point:
                fan_in = int(np.prod(tensor.shape[1:])) if tensor.ndim > 1 else 0
                scale = 1.0 / np.sqrt(fan_in) if fan_in else 0.1
                base = 1.0 if tensor.ndim == 1 and name.endswith(("weight", ".gamma", "running_var")) else 0.0
                noise = scale * torch.randn(tensor.shape, generator=generator)
                tensor.copy_(base + (noise.abs() if name.endswith("running_var") else noise))
    return model.eval()
