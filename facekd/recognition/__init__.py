"""Face recognition: training, distillation, verification metrics, embedding."""
