"""Teachers from other tools: a transformers ``save_pretrained`` folder of an object detector.

Any DETR-family detector transformers can load with ``AutoModelForObjectDetection`` (DETR,
Conditional, DAB, Deformable DETR, RT-DETR, RT-DETRv2, D-FINE, LW-DETR, RF-DETR, YOLOS, …) can
teach a kacli student through task-level amalgamation: all TA needs from a teacher is its class
scores and boxes per query. The model runs through transformers itself (nothing of its
architecture is copied here), frozen and in eval mode:

- the folder is read locally (``local_files_only``), never with ``trust_remote_code`` (a
  ``config.json`` with ``auto_map`` is refused), its weights only from ``model.safetensors``
  (the checkpoint format that runs no code), and weights that do not fit its ``config.json``
  (missing or wrongly shaped tensors) are refused rather than left random;
- each image goes through the folder's own image rules (``preprocessor_config.json``: resize rule,
  rescale, normalisation) — :class:`ImageRule` — starting from the kacli view the student sees, so
  its boxes (normalised cxcywh of its input, which covers the whole view) are in the student's view
  coordinates;
- its classes are ``config.id2label``; a slot without a name (``N/A``, DETR's unused COCO ids) is
  never matched nor predicted. Whether its classifier is a softmax with "no object" (DETR, YOLOS: ``num_labels + 1``
  logits) or per-class sigmoids (the others) is read from the family and checked against the logits.

:func:`is_transformers_folder` tells such a folder from a kacli checkpoint or run folder;
:func:`load_transformers_folder` loads one as a checkpoint-like dict (``kind: "transformers"``)
holding a :class:`TransformersDetector` — an ``nn.Module`` with kacli's detector interface, which
eval and predict score beside kacli's models (:func:`load_detector`, :func:`build_detector`).

A folder of a single-scale encoder family (:data:`SEQUENCE_FAMILIES`: DETR, Conditional, DAB-DETR)
teaches through SA too: :meth:`TransformersDetector.give_sequences` runs it on each view at the
view's own size and gives its encoder's sequences (transformers' ``encoder_hidden_states``: the
input projection's output, then every layer's) on kacli's token grid. A folder of RT-DETR's hybrid
encoder (:data:`AIFI_FAMILIES`: RT-DETR, RT-DETRv2, D-FINE, DEIMv2) gives one: its AIFI output
F5, which guides the student's last encoder layer. The others give no sequence the student is guided by: they teach through TA only
(their part of sequence-level amalgamation is off). A folder whose sequences do not fit the kacli
teachers' (width, depth, stride) teaches through TA only too, and says why. DETR and Conditional DETR folders can also be converted with ``kacli import-checkpoint``.

Modules: :mod:`~kacli.teachers.hf.folder` (what a folder is, reading and loading it),
:mod:`~kacli.teachers.hf.rules` (its image processor's rules), :mod:`~kacli.teachers.hf.detector`
(the model behind kacli's detector interface), :mod:`~kacli.teachers.hf.scoring` (eval and
predict of a folder).
"""

from kacli.teachers.hf.detector import TransformersDetector
from kacli.teachers.hf.folder import (AIFI_FAMILIES, FAMILIES, INSTALL_HINT, KIND, SEQUENCE_FAMILIES, detection_model_types,
                                      folder_label_map, folder_sha256, is_transformers_folder, label_slots,
                                      load_transformers_folder, read_folder_config)
from kacli.teachers.hf.rules import ImageRule
from kacli.teachers.hf.scoring import build_detector, load_detector, match_categories

__all__ = ["AIFI_FAMILIES", "FAMILIES", "INSTALL_HINT", "KIND", "SEQUENCE_FAMILIES", "ImageRule", "TransformersDetector", "build_detector",
           "detection_model_types", "folder_label_map", "folder_sha256", "is_transformers_folder", "label_slots",
           "load_detector", "load_transformers_folder", "match_categories", "read_folder_config"]
