#!/usr/bin/env bash
# GPU figures for issues 23 (segment_speed) and 24 (heatmap cost), full UNI2-h, one call.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 WANDB_MODE=offline HYDRA_FULL_ERROR=1
L=$OUT/log.txt
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch,timm,transformers;print('torch',torch.__version__,'timm',timm.__version__,'transformers',transformers.__version__)"
  echo "hirespath commit $(cat .gpu/commit)"; } > $OUT/device.txt 2>&1
cat $OUT/device.txt
T0=$(date +%s)
timeout 230 python3 tasks/benchmark.py experiment=segment_speed device=cuda 'backbone.overrides={}' embed.batch_size=4 \
  embed.num_workers=8 segment_bench.synthetic_side=7168 hydra.run.dir=/tmp/seg >> $L 2>&1
echo "segment rc=$? $(( $(date +%s)-T0 ))s" | tee -a $L
cp /tmp/seg/segmentation_benchmark.csv $OUT/h200_segment_speed.csv 2>/dev/null
timeout 100 python3 tasks/benchmark.py experiment=segment_speed device=cuda 'backbone.overrides={}' embed.batch_size=2 \
  embed.num_workers=8 segment_bench.synthetic_side=7168 segment_bench.seam_region=3430 \
  'segment_bench.compare=[{tile_size:3430,overlap:128,attention:sparse,window:8}]' hydra.run.dir=/tmp/seg3 >> $L 2>&1
echo "segment3430 rc=$? $(( $(date +%s)-T0 ))s" | tee -a $L
cp /tmp/seg3/segmentation_benchmark.csv $OUT/h200_segment_speed_3430.csv 2>/dev/null
python3 -c "
from pathlib import Path; from hirespath.benchmark.slide_throughput import synthetic_slide
synthetic_slide(Path('/tmp/hm_slide.tiff'), 7168, 0.5)" >> $L 2>&1
LEFT=$(( 470 - ($(date +%s)-T0) ))
echo "heatmap budget ${LEFT}s" | tee -a $L
timeout $LEFT python3 -m hirespath.benchmark.heatmap_cost --out $OUT/h200_heatmap_cost.csv --backbone uni2_h \
  --tile-size 1792 --device cuda --slide /tmp/hm_slide.tiff >> $L 2>&1
echo "heatmap rc=$? $(( $(date +%s)-T0 ))s" | tee -a $L
grep -v "^\s*$" $L | grep -v "it/s\]\|s/it\]" | tail -45
