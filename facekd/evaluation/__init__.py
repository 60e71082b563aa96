"""Evaluation that joins the two halves: quality judged by recognition (EDC), reports."""
