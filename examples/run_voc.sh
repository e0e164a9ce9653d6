#!/usr/bin/env bash
# The paper's PASCAL VOC runs: 2 teachers (Table I, VOC columns; partition voc-2 of Table II) or
# 4 teachers (Table IV; partition voc-4). Train on VOC2007 train + VOC2012 trainval, keep each run's
# best checkpoint on VOC2007 val, report on VOC2007 test (which no selection looks at). The paper
# trains on both years' trainval and evaluates on VOC2007 test; holding out VOC2007 val costs 2,510 of
# its 16,551 training images. See examples/README.md.
#
# Required environment:
#   VOC_ROOT          folder holding VOC2007/ (train, val and test) and VOC2012/ (trainval), e.g. VOCdevkit
#   INIT_CKPT         the teachers' starting point: UP-DETR's ImageNet pre-training checkpoint (.pth),
#                     or a DETR / UP-DETR COCO checkpoint with INIT_LABEL_MAP=coco
#   BACKBONE_WEIGHTS  SwAV ResNet-50 weights for the student's and the raw baseline's backbone
# Optional:
#   TEACHERS (2, or 4)  WORK (runs/voc-$TEACHERS)  GPUS (1)  TOTAL_BATCH (32)  VIEWS (5)  LAYERS (all)
#   INIT_LABEL_MAP (the pre-training head's "1: query patch")  CONFIGS (examples/voc-$TEACHERS)
#   KACLI (kacli)  TORCHRUN (torchrun)
# Every stage skips or resumes what a previous run of this script finished.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TEACHERS=${TEACHERS:-2}
case "$TEACHERS" in
  2) SCHEME=voc-2; TASK_NAMES=(t1 t2); TABLE="Table I" ;;
  4) SCHEME=voc-4; TASK_NAMES=(t1 t2 t3 t4); TABLE="Table IV" ;;
  *) echo "error: TEACHERS must be 2 or 4 (the paper's VOC runs), got '$TEACHERS'" >&2; exit 2 ;;
esac
VIEWS=${VIEWS:-5}
VIEWS_DEFAULT=5
VIEWS_NOTE="epochs (30) and lr_drop (20) assume 5 views (150 and 100 passes)"
# shellcheck source=pipeline.sh
source "$here/pipeline.sh"

# -- checks: everything this run needs, before anything runs -------------------------------------
need_var VOC_ROOT "the folder holding VOC2007/ and VOC2012/ (e.g. VOCdevkit)"
need_weights_vars
for y in 2007 2012; do
  need_dir "$VOC_ROOT/VOC$y/Annotations" "no VOC$y annotations (VOC_ROOT must hold VOC2007/ and VOC2012/)"
  need_dir "$VOC_ROOT/VOC$y/JPEGImages" "no VOC$y images"
done
need_file "$VOC_ROOT/VOC2012/ImageSets/Main/trainval.txt" "no VOC2012 trainval split"
for s in train val; do
  need_file "$VOC_ROOT/VOC2007/ImageSets/Main/$s.txt" "no VOC2007 $s split (it comes with VOC2007 trainval)"
done
need_file "$VOC_ROOT/VOC2007/ImageSets/Main/test.txt" "no VOC2007 test split (extract VOCtest_06-Nov-2007.tar there too)"
check_common

# -- 1. VOC07+12: one VOC root holding VOC2007 train and VOC2012 trainval (split-tasks reads one
#       --train source); VOC2007 val is held out for choosing checkpoints --------------------------
voc0712="$WORK/data/VOC0712"
if [ ! -f "$voc0712/ImageSets/Main/train.txt" ]; then
  stage "1/8 merging VOC2007 train and VOC2012 trainval into $voc0712 (hard links; a copy if links fail)"
  rm -rf "$voc0712.partial"
  mkdir -p "$voc0712.partial/ImageSets/Main"
  for y in 2007 2012; do
    for d in Annotations JPEGImages; do
      mkdir -p "$voc0712.partial/$d"
      cp -al "$VOC_ROOT/VOC$y/$d/." "$voc0712.partial/$d/" 2>/dev/null || cp -a "$VOC_ROOT/VOC$y/$d/." "$voc0712.partial/$d/"
    done
  done
  cat "$VOC_ROOT/VOC2007/ImageSets/Main/train.txt" "$VOC_ROOT/VOC2012/ImageSets/Main/trainval.txt" \
    > "$voc0712.partial/ImageSets/Main/train.txt"
  rm -rf "$voc0712"
  mv "$voc0712.partial" "$voc0712"
fi

# -- 2. tasks -------------------------------------------------------------------------------------
if [ ! -f "$tasks" ]; then
  stage "2/8 split-tasks ($SCHEME)"
  kacli split-tasks --train "$voc0712:train" --val "$VOC_ROOT/VOC2007:val" --test "$VOC_ROOT/VOC2007:test" \
    --scheme "$SCHEME" --out "$WORK/tasks"
fi

run_stages
