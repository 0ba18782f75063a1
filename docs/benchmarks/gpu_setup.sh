# Sourced by the GPU run scripts (h200_run.sh, h200_run2.sh, gpu_both_issues.sh) on the lent machine, from the
# repository root: installs the carried wheels (gpu_prepare.sh), sets the environment, names the device in
# $OUT/device.txt and sets L (the log) and T0 (the start).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 WANDB_MODE=offline HYDRA_FULL_ERROR=1
L=$OUT/log.txt
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch,timm,transformers;print('torch',torch.__version__,'timm',timm.__version__,'transformers',transformers.__version__)"
  echo "hirespath commit $(cat .gpu/commit)"; } > $OUT/device.txt 2>&1
cat $OUT/device.txt
T0=$(date +%s)
