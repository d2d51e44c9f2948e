"""massmerge: merge fine-tuned experts of one pretrained network into one model (MASS and static merges)."""

__version__ = "0.2.0"  # the one definition: pyproject.toml reads it (setuptools dynamic version)
