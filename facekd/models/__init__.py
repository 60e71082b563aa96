"""facekd.models: backbones, heads, the architecture registry and the cost report.

    model = build_model("timm/edgenext_xx_small", 352)   # quality student, scores (B,)
    model = build_model("iresnet50", dropout=0.2)        # recognition, 112×112, embeddings (B, 512)
    x = preprocess(uint8_images, model.normalization)   # facekd.inference: RGB [0, 255] -> float NCHW
    same = build_model(model.arch, model.input_size, **model.options)

Recognition: iresnet18/34/50/100, mobilefacenet (ours, as in insightface). Quality: any
`timm/<name>`, `torchvision/swin_t|swin_s|swin_b`, and iresnet18_quality / iresnet50_quality.
Importing this package registers them all (each where it is defined).
"""

from __future__ import annotations

from facekd.models import backbones, iresnet, mobilefacenet  # noqa: F401  (they register their architectures)
from facekd.models.cost import (GFLOPS_NOTE, cost_report, count_flops, count_params, format_cost_table,
                                measure_latency)
from facekd.models.heads import EmbeddingHead, GDCHead, QualityHead
from facekd.models.registry import (OPTION_HELP, QUALITY_NORMALIZATION, RECOGNITION_NORMALIZATION, RETIRED_ARCHS,
                                    TASKS, ArchSpec, FaceModel, available_archs, available_families, build_model,
                                    get_arch, register_arch, register_family)

__all__ = [
    "ArchSpec", "FaceModel", "EmbeddingHead", "GDCHead", "QualityHead", "GFLOPS_NOTE", "OPTION_HELP",
    "QUALITY_NORMALIZATION", "RECOGNITION_NORMALIZATION", "RETIRED_ARCHS", "TASKS", "available_archs",
    "available_families", "build_model", "cost_report", "count_flops", "count_params", "format_cost_table",
    "get_arch", "measure_latency", "register_arch", "register_family",
]
