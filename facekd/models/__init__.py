"""facekd.models: backbones, heads, the architecture registry and the cost report.

    model = build_model("edgenext_xxs")            # quality student, 288×288, scores (B,)
    model = build_model("iresnet50", dropout=0.2)  # recognition, 112×112, embeddings (B, 512)
    x = model.normalize(uint8_images)              # RGB [0, 255] -> normalised float NCHW
    same = build_model(model.arch, model.input_size, **model.options)

Recognition: iresnet18/34/50/100, mobilefacenet. Quality: edgenext_xxs, mobilenetv3_small,
mobilenetv3_large_050 (students), iresnet18_quality, iresnet50_quality (teachers).
"""

from __future__ import annotations

from facekd.models.cost import (GFLOPS_NOTE, cost_report, count_flops, count_params, format_cost_table,
                                measure_latency)
from facekd.models.heads import EmbeddingHead, GDCHead, QualityHead
from facekd.models.registry import (OPTION_HELP, QUALITY_NORMALIZATION, RECOGNITION_NORMALIZATION, TASKS,
                                    ArchSpec, FaceModel, available_archs, build_model, get_arch,
                                    normalize_images, register_arch)

__all__ = [
    "ArchSpec", "FaceModel", "EmbeddingHead", "GDCHead", "QualityHead", "GFLOPS_NOTE", "OPTION_HELP",
    "QUALITY_NORMALIZATION", "RECOGNITION_NORMALIZATION", "TASKS", "available_archs", "build_model",
    "cost_report", "count_flops", "count_params", "format_cost_table", "get_arch", "measure_latency",
    "normalize_images", "register_arch",
]
