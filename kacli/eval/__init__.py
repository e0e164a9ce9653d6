"""Evaluation: pycocotools bbox metrics (per category, per task, ensembles) and model size."""

from kacli.eval.coco_eval import coco_metrics, pool_detections
from kacli.eval.flops import count_parameters, gflops

__all__ = ["coco_metrics", "pool_detections", "count_parameters", "gflops"]
