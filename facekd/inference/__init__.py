"""Batch inference over image collections: backend choice, overlapped decoding, crash-safe
journaled jobs, sharding over machines and merging of the shards' outputs."""

from facekd.inference.backend import BACKENDS, BackendChoice, open_model
from facekd.inference.conventions import InputConvention
from facekd.inference.jobs import JobSummary, embed_files, merge_outputs, score_files
from facekd.inference.outputs import read_scores
from facekd.inference.shards import Shard, parse_shard

__all__ = ["BACKENDS", "BackendChoice", "InputConvention", "JobSummary", "Shard", "embed_files", "merge_outputs", "open_model",
           "parse_shard", "read_scores", "score_files"]
