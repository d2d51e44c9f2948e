"""massmerge: merge fine-tuned experts of one pretrained network into one model (MASS and static merges)."""

__version__ = "0.1.0"
