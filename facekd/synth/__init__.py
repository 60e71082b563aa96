"""Deterministic synthetic faces: identity datasets for recognition and degraded, MOS-labeled
datasets for quality assessment, IJB-style template sets (`facekd synth identities|quality|ijb`).

Importing this package is cheap; `faces` (the renderer), `degrade` (degradations and the MOS
formula) and `datasets` (the writers) hold the details."""

from __future__ import annotations

from facekd.synth.datasets import (DEFAULT_DIFFICULTY, DEFAULT_QUALITY_SIZE, FORMATS, difficulty_settings,
                                   generate_identities, generate_quality, make_contact_sheet)
from facekd.synth.degrade import (DEGRADATIONS, Degradation, apply_degradations, mos_from_severities,
                                  sample_severities)
from facekd.synth.faces import FaceRenderer, IdentityParams, View, render_face, sample_identity, sample_view
from facekd.synth.ijb import generate_ijb

__all__ = [
    "DEFAULT_DIFFICULTY",
    "DEFAULT_QUALITY_SIZE",
    "DEGRADATIONS",
    "FORMATS",
    "Degradation",
    "FaceRenderer",
    "IdentityParams",
    "View",
    "apply_degradations",
    "difficulty_settings",
    "generate_identities",
    "generate_ijb",
    "generate_quality",
    "make_contact_sheet",
    "mos_from_severities",
    "render_face",
    "sample_identity",
    "sample_severities",
    "sample_view",
]
