"""facekd.models."""
