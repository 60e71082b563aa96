"""Shared test helpers (importable from test modules: pytest puts tests/ on sys.path)."""

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
