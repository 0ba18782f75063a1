#!/usr/bin/env bash
# NB (found 2026-12-07): `backbone.overrides={}` below did not give full UNI2-h: Hydra merges it into the
# experiment's narrowing, so these segment_speed runs used UNI2-h narrowed (depth 12, dim 384; the TFLOP column shows it). Kept as
# run; a run now uses backbone.overrides=null (and `={}` is refused).
# GPU figures for issue 23 (segment_speed), full UNI2-h, one call (prepare: gpu_prepare.sh). The tile readers are
# embed.num_workers' default (null: the cores but two on CUDA). The heatmap cost of issue 24 is measured already
# (h200_heatmap_cost.csv); in its place, entry (b) once more with embed.write_behind=false.
source docs/benchmarks/gpu_setup.sh
SEG="python3 tasks/benchmark.py experiment=segment_speed device=cuda backbone.overrides={} segment_bench.synthetic_side=7168"
# (a) 518 px dense and (b) 1792 px sparse, overlap 128, with the seam measure on a 1792 px region
timeout 230 $SEG embed.batch_size=4 hydra.run.dir=/tmp/seg >> $L 2>&1
echo "segment rc=$? $(( $(date +%s)-T0 ))s" | tee -a $L
cp /tmp/seg/segmentation_benchmark.csv $OUT/h200_segment_speed.csv 2>/dev/null; cp /tmp/seg/segmentation_benchmark.png $OUT/h200_segment_speed.png 2>/dev/null
# 3430 px tiles, seam measure on a 3430 px region
timeout 110 $SEG embed.batch_size=2 segment_bench.seam_region=3430 \
  'segment_bench.compare=[{tile_size:3430,overlap:128,attention:sparse,window:8}]' hydra.run.dir=/tmp/seg3 >> $L 2>&1
echo "segment3430 rc=$? $(( $(date +%s)-T0 ))s" | tee -a $L
cp /tmp/seg3/segmentation_benchmark.csv $OUT/h200_segment_speed_3430.csv 2>/dev/null; cp /tmp/seg3/segmentation_benchmark.png $OUT/h200_segment_speed_3430.png 2>/dev/null
# (b) again, outputs written on the main thread: what write_behind buys on a GPU
LEFT=$(( 480 - ($(date +%s)-T0) ))
echo "write_behind=false budget ${LEFT}s" | tee -a $L
timeout $LEFT $SEG embed.batch_size=4 embed.write_behind=false segment_bench.seam_region=0 \
  'segment_bench.compare=[{tile_size:1792,overlap:128,attention:sparse,window:8}]' hydra.run.dir=/tmp/segwb >> $L 2>&1
echo "segment_no_write_behind rc=$? $(( $(date +%s)-T0 ))s" | tee -a $L
cp /tmp/segwb/segmentation_benchmark.csv $OUT/h200_segment_speed_no_write_behind.csv 2>/dev/null
grep -v "^\s*$" $L | grep -v "it/s\]\|s/it\]" | tail -45
