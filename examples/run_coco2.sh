#!/usr/bin/env bash
# The paper's COCO 2017 run with 2 teachers: Table I (COCO columns), partition coco-2 of Table III.
# Train on train2017 less 5,000 images held out for choosing checkpoints (HOLDOUT), report on val2017
# (which no selection looks at). See examples/README.md.
#
# Required environment:
#   COCO_ROOT         folder holding annotations/instances_{train,val}2017.json, train2017/ and val2017/
#   INIT_CKPT         the teachers' starting point: UP-DETR's ImageNet pre-training checkpoint (.pth),
#                     or a DETR / UP-DETR COCO checkpoint with INIT_LABEL_MAP=coco
#   BACKBONE_WEIGHTS  SwAV ResNet-50 weights for the student's and the raw baseline's backbone
# Optional:
#   WORK (runs/coco-2)  GPUS (1)  TOTAL_BATCH (32)  VIEWS (2)  LAYERS (all; the cache is ~1 TiB, see README)
#   HOLDOUT (5000: train2017 images held out as the validation split)  PYTHON (python3)
#   INIT_LABEL_MAP (the pre-training head's "1: query patch")  CONFIGS (examples/coco-2)
#   KACLI (kacli)  TORCHRUN (torchrun)
# Every stage skips or resumes what a previous run of this script finished.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCHEME=coco-2
TASK_NAMES=(t1 t2)
TABLE="Table I"
VIEWS=${VIEWS:-2}
VIEWS_DEFAULT=2
VIEWS_NOTE="epochs (30) and lr_drop (25) assume 2 views (60 and 50 passes)"
HOLDOUT=${HOLDOUT:-5000}
PYTHON=${PYTHON:-python3}
# shellcheck source=pipeline.sh
source "$here/pipeline.sh"

# -- checks: everything this run needs, before anything runs -------------------------------------
need_var COCO_ROOT "the folder holding annotations/, train2017/ and val2017/"
need_weights_vars
for split in train val; do
  need_file "$COCO_ROOT/annotations/instances_${split}2017.json" "no COCO $split annotations"
  need_dir "$COCO_ROOT/${split}2017" "no COCO $split images"
done
[[ "$HOLDOUT" =~ ^[1-9][0-9]*$ ]] || die "HOLDOUT must be a positive whole number, got '$HOLDOUT'"
command -v "$PYTHON" >/dev/null || die "$PYTHON not found: set PYTHON to a Python 3 interpreter (it carves the held-out split)"
check_common

# -- 1. COCO: each annotation file beside an images/ link to its own folder (split-tasks' --images
#       would name one folder for both splits) ----------------------------------------------------
coco_root_abs=$(cd "$COCO_ROOT" && pwd)
for split in train val; do
  d="$WORK/data/coco-$split"
  if [ ! -e "$d/images" ]; then
    stage "1/8 linking COCO ${split}2017 into $d"
    mkdir -p "$d"
    ln -sfn "$coco_root_abs/annotations/instances_${split}2017.json" "$d/instances_${split}2017.json"
    ln -sfn "$coco_root_abs/${split}2017" "$d/images"
  fi
done

# -- 1b. HOLDOUT train2017 images (seeded choice) as the validation split, the rest for training ---
holdout="$WORK/data/coco-holdout"
if [ ! -f "$holdout/instances_holdout.json" ]; then
  stage "1/8 holding out $HOLDOUT train2017 images for checkpoint selection ($holdout)"
  mkdir -p "$holdout"
  ln -sfn "$coco_root_abs/train2017" "$holdout/images"
  "$PYTHON" - "$coco_root_abs/annotations/instances_train2017.json" "$HOLDOUT" "$holdout" <<'PY'
import json, os, random, sys
src, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
coco = json.load(open(src))
ids = sorted(im["id"] for im in coco["images"])
held = set(random.Random(0).sample(ids, n))
for name, keep in (("instances_train-rest.json", lambda i: i not in held), ("instances_holdout.json", lambda i: i in held)):
    part = dict(coco, images=[im for im in coco["images"] if keep(im["id"])],
                annotations=[a for a in coco["annotations"] if keep(a["image_id"])])
    with open(os.path.join(out, name + ".partial"), "w") as f:
        json.dump(part, f)
    os.replace(os.path.join(out, name + ".partial"), os.path.join(out, name))
PY
fi

# -- 2. tasks -------------------------------------------------------------------------------------
if [ ! -f "$tasks" ]; then
  stage "2/8 split-tasks ($SCHEME)"
  kacli split-tasks --train "$holdout/instances_train-rest.json" --val "$holdout/instances_holdout.json" \
    --test "$WORK/data/coco-val/instances_val2017.json" --scheme "$SCHEME" --out "$WORK/tasks"
fi

run_stages
