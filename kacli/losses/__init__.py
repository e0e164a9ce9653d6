"""DETR's set-prediction losses: Hungarian matcher and set criterion."""

from kacli.losses.criterion import DEFAULT_WEIGHTS, SetCriterion
from kacli.losses.matcher import HungarianMatcher

__all__ = ["DEFAULT_WEIGHTS", "HungarianMatcher", "SetCriterion"]
