"""`facekd recognition distill` with EKD on 2 CPU processes (Fabric DDP, gloo): the P×K batches
are dealt over the ranks, EKD gathers the global batch, rank 0 writes the model and report.
With a TEACHER_CACHE, a second run in OUT/cached distils from it instead of the live teacher.
Usage: recognition_ddp.py TRAIN_DIR TEACHER_MODEL OUT [TEACHER_CACHE]. Run by
tests/test_recognition.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from facekd.config import config_from_dict
from facekd.engine import rank
from facekd.recognition.config import RecognitionConfig
from facekd.recognition.train import train_recognition


def main() -> None:
    train, teacher, out = sys.argv[1:4]
    schedule = {"max_steps": 3, "batch_size": 8, "optimizer": "sgd", "lr": 0.05, "accelerator": "cpu",
                "devices": 2, "eval_every_epochs": 0, "log_every_steps": 1}
    options = {"embedding_size": 32, "width_mult": 0.5, "blocks": [1, 1, 1, 1]}
    config = config_from_dict({
        "teacher": {"arch": "mobilefacenet", "input_size": 32, "options": {"embedding_size": 32}},
        "student": {"arch": "mobilefacenet", "input_size": 32, "options": options},
        "student_train": schedule, "head": {"scale": 16.0}, "sampler": {"images_per_identity": 4},
        "distill": {"method": "ekd", "teacher": teacher}, "data": {"train": train}}, RecognitionConfig)
    report = train_recognition(config, out, role="student")
    Path(out, f"rank{rank()}.json").write_text(json.dumps({"steps": report["steps"], "method": report["method"]}))
    if len(sys.argv) > 4:
        cached = train_recognition(config, Path(out, "cached"), role="student", teacher_cache=sys.argv[4])
        Path(out, "cached", f"rank{rank()}.json").write_text(json.dumps({"steps": cached["steps"],
                                                                         "cache": cached["teacher"]["cache"]}))


if __name__ == "__main__":
    main()
