"""DETR's set-prediction losses: Hungarian matcher and set criterion, and its partial-label variants."""

from kacli.losses.criterion import DEFAULT_WEIGHTS, SetCriterion
from kacli.losses.ground_truth import GT_LOSSES, GroundTruthLoss
from kacli.losses.matcher import HungarianMatcher

__all__ = ["DEFAULT_WEIGHTS", "GT_LOSSES", "GroundTruthLoss", "HungarianMatcher", "SetCriterion"]
