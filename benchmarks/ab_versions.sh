#!/bin/bash
# A/B of two versions of resnext on the same commands: `resnext train` (resnet18, cached
# features, 3 epochs, 64 px) and `resnext batch-predict` (100 photos), alternating, in CPU
# seconds (user+sys) beside wall seconds: on a shared, loaded machine wall time is mostly
# waiting, CPU time is the work done. One thread, decoding in the main process, so that threads
# spinning while they wait do not count as work.
#
#   bash benchmarks/ab_versions.sh OLD_CHECKOUT NEW_CHECKOUT [DATA] [WEIGHTS]
#   (e.g. a `git archive main | tar -x -C /tmp/old` and this checkout)
set -e
OLD=$(realpath "$1"); NEW=$(realpath "$2")
DATA=$(realpath "${3:-../shared/data/flowers5}"); W=$(realpath "${4:-../shared/backbones/resnet18-tinyimagenet.pth}")
PYTHON=${PYTHON:-python}
cd "$(mktemp -d)"
export OMP_NUM_THREADS=1
for round in 1 2 3; do
  for version in old new; do
    code=$OLD; [ $version = new ] && code=$NEW
    rm -rf run-$version cache-$version preds-$version.csv
    /usr/bin/time -f "%U %S %e" -o t-train env PYTHONPATH=$code RESNEXT_CACHE=$PWD/cache-$version $PYTHON -m resnext_cli train $DATA --arch resnet18 --weights $W --img-size 64 --epochs 3 --seed 0 --device cpu --workers 0 --no-report --out run-$version > train-$version.log 2>&1
    /usr/bin/time -f "%U %S %e" -o t-bp env PYTHONPATH=$code $PYTHON -m resnext_cli batch-predict $DATA/val --recursive --checkpoint run-$version/best.pt --device cpu --workers 0 --quiet --output preds-$version.csv > bp-$version.log 2>&1
    echo "$round $version train_cpu_s=$(awk '{print $1+$2}' t-train) train_wall_s=$(awk '{print $3}' t-train) bp_cpu_s=$(awk '{print $1+$2}' t-bp) bp_wall_s=$(awk '{print $3}' t-bp) acc=$(tail -1 run-$version/metrics.csv | cut -d, -f5)"
  done
done
