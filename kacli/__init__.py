"""kacli: knowledge amalgamation for DETR object detectors."""

__version__ = "0.1.0"
