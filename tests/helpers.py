"""Shared test helpers (importable from test modules: pytest puts tests/ on sys.path)."""

import numpy as np

from facekd.config import config_from_dict
from facekd.recognition.config import RecognitionConfig

TINY_TRAIN = {"epochs": 1, "batch_size": 16, "optimizer": "sgd", "lr": 0.05, "accelerator": "cpu",
              "eval_every_epochs": 0, "log_every_steps": 2}


def tiny_recognition_config(data, train=None, **changes):
    """A MobileFaceNet teacher and a smaller student at 32 px on `data/train`, evaluated on
    `data/test` (all pairs) and `data/test/pairs.txt`; top-level keys replaced by `changes`."""
    train = train or TINY_TRAIN
    raw = {"teacher": {"arch": "mobilefacenet", "input_size": 32, "options": {"embedding_size": 32}},
           "student": {"arch": "mobilefacenet", "input_size": 32,
                       "options": {"embedding_size": 32, "width_mult": 0.5, "blocks": [1, 1, 1, 1]}},
           "teacher_train": train, "student_train": train, "head": {"scale": 16.0},
           "sampler": {"images_per_identity": 4, "random_fraction": 0.25},
           "data": {"train": str(data / "train"), "eval": [str(data / "test"), str(data / "test" / "pairs.txt")]},
           "eval_batch_size": 32}
    raw.update(changes)
    return config_from_dict(raw, RecognitionConfig)


def lively(model, seed: int = 0, images: np.ndarray | None = None):
    """Random-init heads give outputs near 0, where any comparison passes; give the model O(1)
    outputs that differ between images: seeded random linear layers, and BatchNorm statistics
    of `images` (uint8 NHWC at the input size, optional) plus 8 random images."""
    import torch
    from torch import nn

    from facekd.inference.predictors import preprocess

    gen = torch.Generator().manual_seed(seed)
    size = model.input_size
    batch = torch.randint(0, 256, (8, size, size, 3), generator=gen, dtype=torch.uint8)
    if images is not None:
        batch = torch.cat([torch.from_numpy(np.ascontiguousarray(images)), batch])
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.normal_(0, module.in_features ** -0.5, generator=gen)
                if module.bias is not None:
                    module.bias.normal_(0, 0.5, generator=gen)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.momentum = None
        model.train()
        model(preprocess(batch, model.normalization))
    return model.eval()


class CodePayload:
    """Pickled into a checkpoint: unpickling it would run code (create the file `marker`)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))
