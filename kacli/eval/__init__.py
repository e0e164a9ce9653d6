"""Evaluation: pycocotools bbox metrics (per category, per task, per data source, ensembles) and model size."""

from kacli.eval.by_source import source_metrics
from kacli.eval.coco_eval import coco_metrics, pool_detections
from kacli.eval.flops import count_parameters, gflops

__all__ = ["coco_metrics", "pool_detections", "source_metrics", "count_parameters", "gflops"]
