# The part of the paper's runs that does not depend on the dataset, sourced by run_voc.sh and
# run_coco2.sh after they set SCHEME, TASK_NAMES, TABLE, VIEWS and VIEWS_NOTE (what student.yaml's
# epochs assume). Those scripts check their dataset, then call check_common, then prepare their data
# (steps 1 and 2), then run_stages (steps 3 to 8). See examples/README.md.
# run_coco_plus_mine.sh uses the settings, helpers, check_run and check_pre_norm, not run_stages.

CONFIGS=${CONFIGS:-$here/$SCHEME}
WORK=${WORK:-runs/$SCHEME}
GPUS=${GPUS:-1}
TOTAL_BATCH=${TOTAL_BATCH:-32}
LAYERS=${LAYERS:-all}
KACLI=${KACLI:-kacli}
TORCHRUN=${TORCHRUN:-torchrun}
tasks="$WORK/tasks/tasks.yaml"
runs="$WORK/runs"
cache="$WORK/cache/train.h5"

die() { echo "error: $*" >&2; exit 2; }
need_var() { [ -n "${!1:-}" ] || die "$1 is not set: $2 (see examples/README.md)"; }
need_file() { [ -f "$1" ] || die "$1: $2"; }
need_dir() { [ -d "$1" ] || die "$1: $2"; }
stage() { echo; echo "== $*"; }
# A run with a last.pt continues (--resume); one stopped before its first epoch ended starts over (--force).
restart_flag() { if [ -f "$1/last.pt" ]; then echo --resume; elif [ -d "$1" ]; then echo --force; fi; }
kacli() { command "$KACLI" "$@"; }
kacli_dist() {  # the stages that run data-parallel under torchrun
  if [ "$GPUS" -gt 1 ]; then "$TORCHRUN" --nproc-per-node "$GPUS" -m kacli "$@"; else kacli "$@"; fi
}

need_weights_vars() {
  need_var INIT_CKPT "UP-DETR's pre-training checkpoint (.pth), the teachers' starting point"
  need_var BACKBONE_WEIGHTS "SwAV ResNet-50 weights (.pth / .pth.tar) for the student's backbone"
}

# Everything but the dataset, before anything runs; sets BATCH and makes the work folders.
check_common() {
  need_file "$INIT_CKPT" "INIT_CKPT names no file"
  need_file "$BACKBONE_WEIGHTS" "BACKBONE_WEIGHTS names no file"
  [ -z "${INIT_LABEL_MAP:-}" ] || [ "$INIT_LABEL_MAP" = coco ] || need_file "$INIT_LABEL_MAP" "INIT_LABEL_MAP is neither 'coco' nor a file"
  check_run
}

# Configs, executables, GPUS and TOTAL_BATCH, VIEWS; sets BATCH and makes the work folders.
check_run() {
  need_file "$CONFIGS/teacher.yaml" "teacher config not found (CONFIGS)"
  need_file "$CONFIGS/student.yaml" "student config not found (CONFIGS)"
  command -v "$KACLI" >/dev/null || die "$KACLI not found on PATH: install the package or set KACLI to the executable's path"
  [[ "$GPUS" =~ ^[1-9][0-9]*$ ]] || die "GPUS must be a positive whole number, got '$GPUS'"
  [[ "$TOTAL_BATCH" =~ ^[1-9][0-9]*$ ]] || die "TOTAL_BATCH must be a positive whole number, got '$TOTAL_BATCH'"
  [ $((TOTAL_BATCH % GPUS)) -eq 0 ] || die "TOTAL_BATCH $TOTAL_BATCH is not divisible by GPUS $GPUS"
  BATCH=$((TOTAL_BATCH / GPUS))
  if [ "$GPUS" -gt 1 ]; then command -v "$TORCHRUN" >/dev/null || die "$TORCHRUN not found (needed for GPUS=$GPUS)"; fi
  if [ "$VIEWS" != "$VIEWS_DEFAULT" ]; then
    echo "note: VIEWS=$VIEWS; examples/$SCHEME/student.yaml's $VIEWS_NOTE" >&2
  fi
  mkdir -p "$WORK/data" "$WORK/weights" "$WORK/cache" "$runs"
}

# An imported checkpoint (SRC, its import-checkpoint --json report) and teacher.yaml agree on pre-norm.
check_pre_norm() {
  local ckpt_pre_norm="" cfg_pre_norm
  if [ -f "$2" ]; then
    ckpt_pre_norm=$(grep -o '"pre_norm": *[a-z]*' "$2" | grep -o '[a-z]*$' || true)
  fi
  cfg_pre_norm=$(grep -o '^ *pre_norm: *[a-z]*' "$CONFIGS/teacher.yaml" | grep -o '[a-z]*$' || true)
  if [ -n "$ckpt_pre_norm" ] && [ -n "$cfg_pre_norm" ] && [ "$ckpt_pre_norm" != "$cfg_pre_norm" ]; then
    die "$1 has pre_norm $ckpt_pre_norm but $CONFIGS/teacher.yaml says $cfg_pre_norm: set model.pre_norm in teacher.yaml and student.yaml to $ckpt_pre_norm"
  fi
}

# Steps 3 to 8, after the script has written $tasks.
run_stages() {
  # -- 3. the teachers' starting point --------------------------------------------------------------
  init_pt="$WORK/weights/init.pt"
  if [ ! -f "$init_pt" ]; then
    stage "3/8 import-checkpoint $INIT_CKPT"
    label_map=${INIT_LABEL_MAP:-}
    if [ -z "$label_map" ]; then  # UP-DETR's pre-training head: class 1 is the query patch
      label_map="$WORK/weights/updetr-pretrain-labels.yaml"
      printf '1: query patch\n' > "$label_map"
    fi
    kacli import-checkpoint "$INIT_CKPT" --out "$init_pt" --label-map "$label_map" --json > "$WORK/weights/import.json"
    echo "wrote $init_pt (its architecture: $WORK/weights/import.json)"
  fi
  check_pre_norm "$INIT_CKPT" "$WORK/weights/import.json"

  # -- 4. one teacher per task ----------------------------------------------------------------------
  teachers=()
  for t in "${TASK_NAMES[@]}"; do
    run="$runs/teacher-$t"
    stage "4/8 train-teacher $t"
    kacli_dist train-teacher --tasks "$tasks" --task "$t" --config "$CONFIGS/teacher.yaml" --init "$init_pt" \
      --batch-size "$BATCH" --out "$run" $(restart_flag "$run")
    teachers+=(--teacher "$run")
  done

  # -- 5. the teachers' sequences and predictions, once (a rerun resumes or reports it up to date) ---
  stage "5/8 cache-teachers ($VIEWS views per image, layers $LAYERS)"
  kacli_dist cache-teachers --tasks "$tasks" "${teachers[@]}" --split train --views "$VIEWS" --layers "$LAYERS" \
    --out "$cache"

  # -- 6. student, slim student and the raw baseline, on the same cached views ------------------------
  stage "6/8 amalgamate: student (SA + TA + ground truth)"
  kacli_dist amalgamate --cache "$cache" --tasks "$tasks" --config "$CONFIGS/student.yaml" \
    --backbone-weights "$BACKBONE_WEIGHTS" --batch-size "$BATCH" --out "$runs/student" $(restart_flag "$runs/student")
  stage "6/8 amalgamate: slim student (redundancy compression)"
  kacli_dist amalgamate --cache "$cache" --tasks "$tasks" --config "$CONFIGS/student.yaml" --compress redundancy \
    --backbone-weights "$BACKBONE_WEIGHTS" --batch-size "$BATCH" --out "$runs/student-slim" $(restart_flag "$runs/student-slim")
  stage "6/8 amalgamate: raw baseline (DETR on ground truth)"
  kacli_dist amalgamate --cache "$cache" --tasks "$tasks" --config "$CONFIGS/student.yaml" --method raw \
    --backbone-weights "$BACKBONE_WEIGHTS" --batch-size "$BATCH" --out "$runs/raw" $(restart_flag "$runs/raw")

  # -- 7. evaluation on the test split (runs chose best.pt on val): each model, the teachers' ensemble
  for t in "${TASK_NAMES[@]}"; do
    stage "7/8 eval teacher-$t"
    kacli eval --model "$runs/teacher-$t" --tasks "$tasks" --split test --json "$runs/teacher-$t/eval.json"
  done
  stage "7/8 eval ensemble"
  ensemble=()
  for t in "${TASK_NAMES[@]}"; do ensemble+=(--model "$runs/teacher-$t"); done
  kacli eval "${ensemble[@]}" --tasks "$tasks" --split test --json "$runs/ensemble.json"
  for r in raw student-slim student; do
    stage "7/8 eval $r"
    kacli eval --model "$runs/$r" --tasks "$tasks" --split test --json "$runs/$r/eval.json"
  done

  # -- 8. the table and the curves ----------------------------------------------------------------
  stage "8/8 report"
  report_inputs=()
  for t in "${TASK_NAMES[@]}"; do report_inputs+=("$runs/teacher-$t"); done
  kacli report "${report_inputs[@]}" "$runs/ensemble.json" "$runs/raw" "$runs/student-slim" "$runs/student" \
    --out "$WORK/report"
  echo "report: $WORK/report/report.md (compare with examples/README.md, $TABLE)"
}
