"""fusionct pipeline: plain-Python steps a study goes through (no Prefect here)."""

__version__ = "0.1.0"
