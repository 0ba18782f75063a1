#!/usr/bin/env bash
# The probability TIFF written from a map larger than the memory its process may use (Linux, root: a cgroup-v1 memory
# limit and a dropped page cache), for the map layout before (interleaved, BASE checkout) and after (planar, this one).
#   bash docs/benchmarks/cpu_probs_tiff_cold.sh BASE_CHECKOUT [SIDE] [LIMIT_MB] [WORK_DIR]
set -euo pipefail
base=$1 side=${2:-16384} limit=${3:-768} work=${4:-$(mktemp -d -p .)}
here=$(cd "$(dirname "$0")/../.." && pwd)
py=$here/.venv/bin/python
script=$here/docs/benchmarks/cpu_probs_tiff_cold.py
cg=/sys/fs/cgroup/memory/hirespath_cold
mkdir -p "$cg"
echo $((limit << 20)) > "$cg/memory.limit_in_bytes"
"$py" "$script" prepare "$work/planar.npy" "$side" planar
"$py" "$script" prepare "$work/interleaved.npy" "$side" interleaved
echo "label,map_shape,map_gb,seconds,read_gb"
for round in 1 2; do
  for layout in interleaved planar; do
    src=$here/src; [ $layout = interleaved ] && src=$base/src
    sync; echo 3 > /proc/sys/vm/drop_caches
    bash -c "echo \$\$ > $cg/cgroup.procs; PYTHONPATH=$src exec $py $script write $work/$layout.npy $work/out.tif '$layout map; ${limit} MB limit'"
    rm -f "$work/out.tif"
  done
done
rm -rf "$work"
rmdir "$cg"
