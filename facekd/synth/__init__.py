"""facekd.synth."""
