"""Reading and writing images and the field's dataset formats."""
