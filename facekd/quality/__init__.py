"""Face image quality assessment: the self-training + distillation pipeline, metrics, scoring."""
