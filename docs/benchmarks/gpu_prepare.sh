#!/usr/bin/env bash
# Prepares a GPU benchmark run with the device tool, from the repository root on the development machine.
# The GPU image has torch, timm, lightning, transformers, h5py, opencv, tifffile, numpy, pillow and pyyaml, but not
# Hydra, shapely or the slide readers, and no network: their wheels (for its Python 3.12) go to .whl/ (git-ignored,
# ~35 MB of the 64 MiB that may travel), the commit to .gpu/commit. Then, with 15 minutes of device time, one call
# for both issues (the max-resolution search and the write_behind comparison left out):
#   run  command="bash docs/benchmarks/gpu_both_issues.sh"  carry=[".whl", ".gpu"]  timeout_s=600
# or, with more time, one call per issue:
#   run  command="bash docs/benchmarks/h200_run.sh"   carry=[".whl", ".gpu"]  timeout_s=600   # issue 26
#   run  command="bash docs/benchmarks/h200_run2.sh"  carry=[".whl", ".gpu"]  timeout_s=600   # issue 23
# Each script installs the wheels into /tmp/site there, runs from src/ and leaves its CSVs and log under $OUT.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
pip=${PIP:-.venv/bin/pip}
rm -rf .whl && mkdir -p .whl .gpu
target=(--python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
  --platform manylinux2014_x86_64 --only-binary=:all: --no-deps -d .whl)
# --no-deps: the image's own numpy, pillow, tifffile, fsspec and packaging stay the ones torch was built with
"$pip" download -q "${target[@]}" hydra-core==1.3.2 omegaconf==2.3.0 shapely openslide-python openslide-bin \
  tiffslide zarr numcodecs donfig google-crc32c msgspec imagecodecs
"$pip" wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3  # Hydra's parser: an sdist only on PyPI
git rev-parse --short HEAD > .gpu/commit
[ -z "$(git status --porcelain --untracked-files=no)" ] || echo "note: uncommitted changes travel too; .gpu/commit names HEAD"
du -sh .whl && ls .whl
