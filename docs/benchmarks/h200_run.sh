#!/usr/bin/env bash
# NB (found 2026-12-07): `backbone.overrides={}` below did not give full UNI2-h: Hydra merges it into the
# experiment's narrowing, so the embed_speed step ran UNI2-h narrowed (depth 12, dim 384; the TFLOP column shows it). Kept as
# run; a run now uses backbone.overrides=null (and `={}` is refused).
# GPU figures for issue 26 (table1_cost, max resolution in 80 GB, embed_speed), one call (prepare: gpu_prepare.sh).
source docs/benchmarks/gpu_setup.sh
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -lms 250 > /tmp/util.csv 2>&1 &
# 1. Table 1 cost sweep, 80 GB budget as the H100 run (comparable), bf16 (260 s: pruned blocks compile a 2nd flex).
#    The experiment's own rows only: the [gather] and [varlen] kernels run in gpu_both_issues.sh's table1 step.
timeout 260 python3 tasks/benchmark.py experiment=table1_cost memory_budget_gb=80 repeats=3 hydra.run.dir=/tmp/t1 >> $L 2>&1
echo "table1 rc=$? $(( $(date +%s)-T0 ))s" | tee -a $L
cp /tmp/t1/benchmark.csv $OUT/table1_cost.csv 2>/dev/null; cp /tmp/t1/benchmark.png $OUT/table1_cost.png 2>/dev/null
# 2. whole-slide embedding throughput, full UNI2-h bf16-mixed
echo "embed start $(date -u +%H:%M:%S.%N)" >> $L
# embed.num_workers left at its default (null: the cores but two on CUDA); the run at cd1cf8e passed 8 readers
timeout 170 python3 tasks/benchmark.py experiment=embed_speed device=cuda 'backbone.overrides={}' embed.batch_size=16 \
  slides.synthetic_side=7168 \
  'slides.compare=[{tile_size:224,attention:dense,prune_ratio:0.0},{tile_size:1792,attention:dense,prune_ratio:0.0},{tile_size:1792,attention:sparse,window:8,prune_ratio:0.6,prune_layer:2},{tile_size:3430,attention:sparse,window:8,prune_ratio:0.6,prune_layer:4}]' \
  hydra.run.dir=/tmp/emb >> $L 2>&1
echo "embed rc=$? $(( $(date +%s)-T0 ))s end $(date -u +%H:%M:%S.%N)" | tee -a $L
cp /tmp/emb/embedding_benchmark.csv $OUT/embed_speed.csv 2>/dev/null; cp /tmp/emb/embedding_benchmark.png $OUT/embed_speed.png 2>/dev/null
cp /tmp/util.csv $OUT/gpu_util.csv
# 3. largest resolution in 80 GB (sparse+prune only; eager's limit is known to be < 2688 at 80 GB)
LEFT=$(( 560 - ($(date +%s)-T0) ))
echo "maxres budget ${LEFT}s" | tee -a $L
timeout $LEFT python3 tasks/benchmark.py experiment=table1_cost max_resolution.enabled=true 'resolutions=[224]' repeats=1 \
  'compare=[{attention:sparse,window:8,prune_ratio:0.6,prune_layer:4}]' max_resolution.start=14000 hydra.run.dir=/tmp/mr >> $L 2>&1
echo "maxres rc=$? $(( $(date +%s)-T0 ))s" | tee -a $L
cp /tmp/mr/max_resolution.csv $OUT/max_resolution_80gb.csv 2>/dev/null
kill %1; cp /tmp/util.csv $OUT/gpu_util.csv
grep -v "^\s*$" $L | tail -60
