"""The data stage: dataset readers (COCO json, PASCAL VOC, YOLO), task partitions, the task
manifest (``tasks.yaml``), the demo dataset, and the training-time dataset and transforms."""
