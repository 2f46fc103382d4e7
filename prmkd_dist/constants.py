"""Project-wide constants (see the package docstring for the id conventions)."""

PAD_ID = -1
