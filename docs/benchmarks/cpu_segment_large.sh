#!/usr/bin/env bash
# segment_slides on one large generated slide, end to end, for its memory: a 24,576 px slide at 0.5 µm/px (~40 % tissue,
# written tile by tile by large_slide.py), segmented at 0.5 µm/px with 448 px tiles, so the map is 8 × 24,576² px
# (4.8 GB on disk). The model is the tiny one cpu_segment_demo.sh trains (3 epochs here); run at 0.5 µm/px, 3.9× off
# its training scale, it gives noisy maps with hundreds of thousands of specks per class — the hard case for the
# GeoJSON step. Prints /usr/bin/time's figures and the process's peak anonymous memory (RssAnon: the file-backed
# pages of the map's memmap are page cache, reclaimable, and counted apart as RssFile).
#   bash docs/benchmarks/cpu_segment_large.sh OUT [SIDE]
set -euo pipefail
OUT=${1:?usage: cpu_segment_large.sh OUT [SIDE]} SIDE=${2:-24576}
here=$(cd "$(dirname "$0")/../.." && pwd)
export WANDB_MODE=offline PATH="$here/.venv/bin:$PATH"
mkdir -p "$OUT/wsi"
[ -f "$OUT/wsi/large.tiff" ] || python "$here/docs/benchmarks/large_slide.py" "$OUT/wsi/large.tiff" "$SIDE" 0.5
if [ ! -d "$OUT/segment_run/checkpoints" ]; then
  python -c "from hirespath.data.segpath_synthetic import make_synthetic_segpath as m; m('$OUT/segpath', images_per_split=8, size=224, seed=0)"
  hirespath segment data.root="$OUT/segpath" data.batch_size=4 data.num_workers=1 trainer.max_epochs=3 \
    +trainer.limit_val_batches=2 optim.lr=1e-3 optim.backbone_lr_mult=1.0 logger=csv backbone=tiny attention=sparse \
    attention.window=4 resolution=112 head.num_queries=20 head.hidden_dim=64 head.decoder_layers=2 \
    head.pixel_decoder_layers=1 head.train_num_points=4096 head.adapter.heads=4 head.adapter.spm_inplanes=16 \
    hydra.run.dir="$OUT/segment_run" > "$OUT/train.log" 2>&1
fi
/usr/bin/time -v hirespath segment_slides ckpt="$OUT/segment_run" wsi_dir="$OUT/wsi" job_dir="$OUT/job" tile.size=448 \
  tile.overlap=64 tile.mpp=0.5 segment.min_area_um2=500 embed.overwrite=true hydra.run.dir="$OUT/run" \
  > "$OUT/segment_slides.log" 2> "$OUT/segment_slides.err" &
sleep 10
pid=$(pgrep -n -f "hirespath segment_slides ckpt=$OUT/segment_run")
peak=0
while kill -0 "$pid" 2>/dev/null; do
  anon=$(awk '/RssAnon/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)
  (( ${anon:-0} > peak )) && peak=$anon
  sleep 1
done
wait
grep -E "Elapsed|Maximum resident" "$OUT/segment_slides.err"
echo "peak RssAnon: $(( peak / 1024 )) MB"
grep -E "tissue mm²/s|segmentations in" "$OUT/segment_slides.log" || true
