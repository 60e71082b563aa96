"""facekd.engine."""
