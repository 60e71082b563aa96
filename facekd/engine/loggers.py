"""The trainer's metric files beside metrics.jsonl, through lightning-fabric's loggers:
`metrics.csv` (always; one row per metrics.jsonl record: step, epoch, train/loss, ...,
eval/srcc, ...) and TensorBoard event files in `tensorboard/` (when tensorboard or
tensorboardX is importable: `pip install facekd[tensorboard]`). Rank 0 only.

Resume: metrics.csv is rewritten from the (truncated) metrics.jsonl, so it holds exactly the
rows of metrics.jsonl. TensorBoard files cannot be truncated: the new writer gets
`purge_step` = checkpoint step + 1, so TensorBoard hides what the killed run logged after the
checkpoint."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping


def tensorboard_available() -> bool:
    """Whether lightning-fabric's TensorBoardLogger can write here."""
    return any(importlib.util.find_spec(name) is not None for name in ("tensorboard", "tensorboardX"))


def _columns(record: Mapping[str, Any]) -> dict[str, Any]:
    """A metrics.jsonl record as CSV columns / TensorBoard tags: `epoch`, then `train/loss`,
    `eval/srcc`, ... (the event in the name, so train and eval metrics of one name stay apart)."""
    event = record.get("event", "train")
    return {k if k == "epoch" else f"{event}/{k}": v for k, v in record.items() if k not in ("event", "step")}


class MetricLoggers:
    """metrics.csv and, optionally, TensorBoard in `out_dir`; `log` takes a metrics.jsonl record."""

    def __init__(self, out_dir: Path, *, tensorboard: bool | None = None, history: Iterable[Mapping[str, Any]] = (),
                 resumed_step: int | None = None):
        from lightning_fabric.loggers import CSVLogger, TensorBoardLogger

        out_dir.mkdir(parents=True, exist_ok=True)
        self.csv = CSVLogger(out_dir, name="", version="")
        with warnings.catch_warnings():  # "directory not empty": it removes the old metrics.csv, as wanted
            warnings.simplefilter("ignore")
            self.csv.experiment
        for record in history:
            self._log_csv(record)
        self.csv.save()
        self.tensorboard = None
        if tensorboard is None:
            tensorboard = tensorboard_available()
        if tensorboard:
            board = out_dir / "tensorboard"
            if resumed_step is None:  # a fresh start: no events of an older run in the same folder
                for old in board.glob("events.out.tfevents.*"):
                    old.unlink()
            purge = {} if resumed_step is None else {"purge_step": resumed_step + 1}
            self.tensorboard = TensorBoardLogger(out_dir, name="tensorboard", version="", default_hp_metric=False,
                                                 **purge)

    def _log_csv(self, record: Mapping[str, Any]) -> None:
        self.csv.log_metrics(_columns(record), step=int(record["step"]))

    def log(self, record: Mapping[str, Any]) -> None:
        self._log_csv(record)
        self.csv.save()
        if self.tensorboard is not None:
            scalars = {k: float(v) for k, v in _columns(record).items() if isinstance(v, (int, float))}
            self.tensorboard.log_metrics(scalars, step=int(record["step"]))

    def close(self) -> None:
        self.csv.finalize("success")
        if self.tensorboard is not None:
            self.tensorboard.finalize("success")
