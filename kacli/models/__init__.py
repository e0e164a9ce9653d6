"""DETR models: configuration, backbones, transformer, detector, post-processing."""

from kacli.models.config import PRESETS, ModelConfig, model_config
from kacli.models.detr import DETR
from kacli.models.postprocess import postprocess

__all__ = ["DETR", "ModelConfig", "PRESETS", "model_config", "postprocess"]
