#!/usr/bin/env bash
# COCO classes plus yours: one detector for (a subset of) the 80 COCO categories that
# facebookresearch/detr's COCO model knows and the new categories of your own dataset, trained by
# knowledge amalgamation from two teachers: that COCO model as it is, and the same model fine-tuned
# on your data. Only your images are needed. See examples/README.md ("COCO classes plus yours").
#
# Required environment:
#   DETR_CKPT         facebookresearch/detr's COCO checkpoint (detr-r50-e632da11.pth): the COCO teacher,
#                     your teacher's starting point and the student's backbone
#   USER_TRAIN        your training set: a COCO json, a VOC root (VOCdevkit/VOC2007:trainval) or a YOLO
#                     root / data.yaml (PATH or PATH:SPLIT)
#   USER_VAL          your validation set, written the same way (each run keeps its best epoch on it)
# Optional:
#   USER_TEST         your test set, written the same way: the reported figures, which no choice looked
#                     at (without it the report is on USER_VAL, the set the checkpoints were chosen on)
#   USER_IMAGES, USER_VAL_IMAGES, USER_TEST_IMAGES   image folders of COCO json sets (default: beside the json)
#   COCO_CLASSES (all 80)  e.g. person,car,dog: the COCO categories the student keeps
#   RENAMES ()             e.g. pedestrian=person: your names for COCO's (one class, labelled by you too)
#   MINE (mine)            your task's name       BACKBONE_WEIGHTS (DETR_CKPT)  the student's backbone
#   WORK (runs/coco-plus-mine)  GPUS (1)  TOTAL_BATCH (16)  VIEWS (5)  LAYERS (all)
#   CONFIGS (examples/coco-plus-mine)  KACLI (kacli)  TORCHRUN (torchrun)
# Every stage skips or resumes what a previous run of this script finished.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCHEME=coco-plus-mine
TOTAL_BATCH=${TOTAL_BATCH:-16}
VIEWS=${VIEWS:-5}
VIEWS_DEFAULT=5
VIEWS_NOTE="epochs (30) and lr_drop (20) assume 5 views (150 and 100 passes)"
MINE=${MINE:-mine}
COCO_CLASSES=${COCO_CLASSES:-}
RENAMES=${RENAMES:-}
# shellcheck source=pipeline.sh
source "$here/pipeline.sh"

# -- checks: everything this run needs, before anything runs -------------------------------------
# A source is PATH or PATH:SPLIT (a VOC root's image set, a YOLO data.yaml's split).
source_path() { if [ -e "$1" ]; then echo "$1"; else echo "${1%:*}"; fi; }
need_var DETR_CKPT "facebookresearch/detr's COCO checkpoint (detr-r50-e632da11.pth)"
need_var USER_TRAIN "your training set (COCO json, VOC root:split or YOLO root/data.yaml)"
need_var USER_VAL "your validation set (COCO json, VOC root:split or YOLO root/data.yaml)"
need_file "$DETR_CKPT" "DETR_CKPT names no file"
BACKBONE_WEIGHTS=${BACKBONE_WEIGHTS:-$DETR_CKPT}
need_file "$BACKBONE_WEIGHTS" "BACKBONE_WEIGHTS names no file"
for v in USER_TRAIN USER_VAL; do
  p=$(source_path "${!v}")
  [ -e "$p" ] || die "$p: $v names no file or folder"
done
for v in USER_IMAGES USER_VAL_IMAGES; do
  [ -z "${!v:-}" ] || need_dir "${!v}" "$v names no folder"
done
[ "$MINE" != coco ] || die "MINE must not be 'coco': that is the COCO teacher's task"
check_run

coco_pt="$WORK/weights/detr-coco.pt"
teacher="$runs/teacher-$MINE"

# -- 1. the COCO DETR, converted: the COCO teacher and your teacher's starting point --------------
if [ ! -f "$coco_pt" ]; then
  stage "1/6 import-checkpoint $DETR_CKPT (COCO label map)"
  kacli import-checkpoint "$DETR_CKPT" --out "$coco_pt" --label-map coco --json > "$WORK/weights/import.json"
  echo "wrote $coco_pt (its architecture: $WORK/weights/import.json)"
fi
check_pre_norm "$DETR_CKPT" "$WORK/weights/import.json"

# -- 2. tasks: yours (your images, your classes) and COCO's (no images, the COCO model's classes) --
merge=(--task "$MINE=$USER_TRAIN" --val "$MINE=$USER_VAL")
[ -z "${USER_IMAGES:-}" ] || merge+=(--images "$MINE=$USER_IMAGES")
[ -z "${USER_VAL_IMAGES:-}" ] || merge+=(--val-images "$MINE=$USER_VAL_IMAGES")
[ -z "${USER_TEST:-}" ] || merge+=(--test "$MINE=$USER_TEST")
[ -z "${USER_TEST_IMAGES:-}" ] || merge+=(--test-images "$MINE=$USER_TEST_IMAGES")
merge+=(--teacher-only "coco=$coco_pt")
[ -z "$COCO_CLASSES" ] || merge+=(--categories "coco=$COCO_CLASSES")
IFS=',' read -r -a renames <<< "$RENAMES"
for r in "${renames[@]}"; do merge+=(--rename "$r"); done
merge_record="$WORK/merge-tasks.args"  # what tasks.yaml was built from: a rerun with other inputs stops
if [ ! -f "$tasks" ]; then
  stage "2/6 merge-tasks ($MINE: $USER_TRAIN; coco: ${COCO_CLASSES:-all 80 categories})"
  kacli merge-tasks "${merge[@]}" --out "$WORK/tasks"
  printf '%s\n' "${merge[@]}" > "$merge_record"
elif [ -f "$merge_record" ] && [ "$(printf '%s\n' "${merge[@]}")" != "$(cat "$merge_record")" ]; then
  die "$tasks was built from other inputs (USER_*, COCO_CLASSES, RENAMES or MINE; see $merge_record): set WORK to a new folder"
fi

# -- 3. your teacher: the COCO DETR fine-tuned on your task (a new class head) ---------------------
stage "3/6 train-teacher $MINE (from the COCO DETR)"
kacli_dist train-teacher --tasks "$tasks" --task "$MINE" --config "$CONFIGS/teacher.yaml" --init "$coco_pt" \
  --batch-size "$BATCH" --out "$teacher" $(restart_flag "$teacher")

# -- 4. both teachers over your training images, in tasks.yaml's order (yours, then COCO) ----------
stage "4/6 cache-teachers ($VIEWS views per image, layers $LAYERS)"
kacli_dist cache-teachers --tasks "$tasks" --teacher "$teacher" --teacher "$coco_pt" --split train --views "$VIEWS" \
  --layers "$LAYERS" --out "$cache"

# -- 5. the student: SA + TA from both teachers, your ground truth ---------------------------------
stage "5/6 amalgamate: student"
kacli_dist amalgamate --cache "$cache" --tasks "$tasks" --config "$CONFIGS/student.yaml" \
  --backbone-weights "$BACKBONE_WEIGHTS" --batch-size "$BATCH" --out "$runs/student" $(restart_flag "$runs/student")

# -- 6. your test set (your validation set without one): your teacher and the student ------------
report_split=$([ -n "${USER_TEST:-}" ] && echo test || echo val)
for m in "teacher-$MINE" student; do
  stage "6/6 eval $m ($report_split split)"
  kacli eval --model "$runs/$m" --tasks "$tasks" --split "$report_split" --json "$runs/$m/eval.json"
done
kacli report "$teacher" "$runs/student" --out "$WORK/report"
echo "student: $runs/student/best.pt (kacli predict --model $runs/student IMAGE ...; report: $WORK/report/report.md)"
