"""Opening a slide (OpenSlide, tiffslide fallback), its microns per pixel and levels, and reading its pixels.

Every read error of a slide becomes a :class:`SlideError` whose message says what is wrong in the user's words
(a truncated copy, a corrupt file, no mpp): the run skips the slide and lists the reason in skipped.csv.
"""

from __future__ import annotations

import logging
import math
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from .listing import dicom_files

log = logging.getLogger("hirespath.wsi")

# a level whose downsample is within 1 % above the needed one is read and upsampled by ≤ 1 % (SVS levels are
# 4.0002×, 16.001×…): reading the next finer level instead would cost 4–16× the pixels for no detail
LEVEL_TOLERANCE = 0.01
TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif")
# plain images (a region exported as PNG/JPEG): one level, decoded whole by PIL (OpenSlide's ImageSlide; once for
# all reader threads, tile_readers.SlideTileDataset.decode_once); they carry no mpp, so a slides= CSV gives it (or
# data.default_mpp)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
READABLE = ("whole-slide images that OpenSlide or tiffslide open (svs, tif/tiff, ndpi, mrxs, scn, vms, bif, ...), "
            "DICOM slides (a folder of one series' .dcm files) and PNG/JPEG images")  # fmt: skip


class SlideError(Exception):
    """A slide that cannot be used (unreadable, no mpp, no tissue); the run skips it and lists the reason."""


def _first_ifd_offset(path: Path) -> int | None:
    """The offset of the first image directory from the TIFF header (classic or BigTIFF), or None if not a TIFF."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if len(head) < 8 or head[:2] not in (b"II", b"MM"):
        return None
    order = "<" if head[:2] == b"II" else ">"
    magic = struct.unpack(order + "H", head[2:4])[0]
    if magic == 42:
        return struct.unpack(order + "I", head[4:8])[0]
    if magic == 43 and len(head) >= 16:
        return struct.unpack(order + "Q", head[8:16])[0]
    return None


def truncation(path: str | Path) -> str | None:
    """Why a TIFF is truncated (its first directory or its tiles lie past the end of the file), or None (not a
    TIFF, or complete).

    A truncated copy otherwise shows as a decoder error ("Empty input file", "index 0 out of range(0)") or, when
    only the small pyramid levels are cut, as a slide without tissue."""
    path = Path(path)
    if path.suffix.lower() not in TIFF_SUFFIXES:
        return None
    try:
        size = path.stat().st_size
        first = _first_ifd_offset(path)
        if first is not None and first >= size:
            return (  # a cut copy, or not a TIFF at all: the header alone cannot tell
                f"cannot read {path.name}: the file is truncated or corrupt ({size} bytes, but its first image "
                f"directory starts at byte {first}); copy it again"
            )
        import tifffile

        with tifffile.TiffFile(path) as tif:
            end = max(
                (o + n for page in tif.pages for o, n in zip(page.dataoffsets, page.databytecounts) if n),
                default=0,
            )
    except Exception:  # noqa: BLE001 — not a TIFF tifffile can parse: left to the readers' own errors
        return None
    if end > size:
        return f"truncated file {path.name}: {size} bytes, but its image data reaches byte {end}; copy it again"
    return None


def unreadable(path: str | Path | None, err: BaseException) -> SlideError:
    """The SlideError for a slide whose pixels or metadata could not be read: the truncation when that is why,
    else "cannot read <file>: the file is truncated or corrupt (<the reader's error>)"."""
    if isinstance(err, SlideError):
        return err
    path = Path(path) if path is not None else None
    cut = truncation(path) if path is not None and path.is_file() else None
    name = path.name if path is not None else "the slide"
    return SlideError(cut or f"cannot read {name}: the file is truncated or corrupt ({type(err).__name__}: {err})")


def open_slide(path: str | Path):
    """Open a slide with OpenSlide, or tiffslide where OpenSlide is missing or refuses the file; a PNG/JPEG image
    as a one-level slide; a folder as a DICOM slide.

    The handle's metadata (properties, levels) is read here, so a file that opens but has no readable image
    directory fails now with a SlideError naming the file, not later with a decoder's IndexError."""
    path = Path(path)
    if path.is_dir():
        return _open_dicom(path)
    if not path.is_file():
        raise SlideError(f"missing file {path}")
    if path.stat().st_size == 0:  # a copy that never got its data (a full disk, a transfer stopped at the start)
        raise SlideError(f"cannot read {path.name}: the file is empty (0 bytes); copy it again")
    errors = []
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _open_image(path)
    try:
        import openslide

        slide = openslide.OpenSlide(str(path))
    except Exception as err:  # noqa: BLE001 — OpenSlide raises several types for unreadable files
        errors.append(f"openslide: {err}")
    else:
        if slide.level_count > 1 or path.suffix.lower() not in TIFF_SUFFIXES:
            return slide
        pyramid = _subifd_pyramid(path)
        if pyramid is None:
            return slide
        slide.close()
        return pyramid
    if (depth := _sample_dtype(path)) not in (None, "uint8"):  # tiffslide hands PIL arrays it cannot take
        raise SlideError(f"cannot read {path.name}: its samples are {depth}; hirespath reads 8-bit slides (and "
                         "those OpenSlide reads: tiled TIFFs). Convert it to 8 bits, e.g. vips cast IN 8bit.v uchar "
                         "--shift, then vips tiffsave 8bit.v OUT.tif --tile --pyramid --compression jpeg")  # fmt: skip
    try:
        import tiffslide

        slide = tiffslide.TiffSlide(str(path))
    except Exception as err:  # noqa: BLE001
        errors.append(f"tiffslide: {err}")
        raise SlideError(truncation(path) or f"cannot read {path.name}: " + "; ".join(errors) +
                         f" (hirespath reads {READABLE})") from err  # fmt: skip
    try:  # tiffslide opens lazily: touch what every caller needs
        _ = slide.properties, slide.dimensions, slide.level_downsamples
    except Exception as err:  # noqa: BLE001 — tifffile raises IndexError, KeyError, ValueError... here
        slide.close()
        raise unreadable(path, err) from err
    return slide


def _subifd_pyramid(path: Path):
    """The slide through tiffslide when it sees pyramid levels OpenSlide does not, else None.

    OpenSlide reads a TIFF's chain of image directories only; an OME-TIFF pyramid (bfconvert, QuPath's File → Export
    → OME-TIFF) keeps its reduced levels in SubIFDs, so OpenSlide shows it as one level: every tile would be read at
    full resolution and resized, and every thumbnail read from the whole full-resolution image."""
    if _sample_dtype(path) not in (None, "uint8"):  # tiffslide would hand PIL 16-bit arrays; OpenSlide reads them
        return None
    try:
        import tiffslide

        slide = tiffslide.TiffSlide(str(path))
        if slide.level_count > 1:
            return slide
        slide.close()
    except Exception:  # noqa: BLE001 — OpenSlide opened it: keep that
        pass
    return None


def _sample_dtype(path: Path) -> str | None:
    """The sample type of a TIFF's first image (``uint8``, ``uint16``, ...); None when tifffile cannot tell."""
    try:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            return str(tif.pages[0].dtype)
    except Exception:  # noqa: BLE001 — not for tifffile to judge: the readers say what is wrong
        return None


def _open_dicom(folder: Path):
    """A DICOM slide: the folder of its series' DICOM files, opened by OpenSlide (4.0+) through one of them — it
    reads the series' other files (levels, label, overview) from the same folder. Files that are not a whole-slide
    image (a DICOMDIR, a structured report) are passed over."""
    files = dicom_files(folder)
    if not files:
        raise SlideError(
            f"{folder} is a folder without DICOM files; a folder is read as one DICOM slide (the .dcm files of one "
            f"series), else give a slide file ({READABLE})"
        )
    try:
        import openslide
    except ImportError as err:
        raise SlideError(f"cannot read the DICOM slide {folder.name}: OpenSlide is not installed "
                         "(pip install openslide-bin openslide-python)") from err  # fmt: skip
    errors = []
    for file in files:
        try:
            slide = openslide.OpenSlide(str(file))
            _ = slide.level_downsamples
        except Exception as err:  # noqa: BLE001 — not a WSI instance, or a level OpenSlide cannot decode
            errors.append(f"{file.name}: {err}")
            continue
        return slide
    raise SlideError(
        f"cannot read the DICOM slide {folder.name}: OpenSlide opens none of its {len(files)} DICOM files "
        f"({'; '.join(errors[:2])}{'; ...' if len(errors) > 2 else ''}); OpenSlide 4 reads VL Whole Slide "
        "Microscopy images in JPEG, JPEG 2000 or uncompressed"
    )


def _open_image(path: Path):
    """A PNG/JPEG as OpenSlide's one-level ImageSlide (PIL underneath; read whole on the first region)."""
    try:
        from openslide import ImageSlide

        slide = ImageSlide(str(path))
        _ = slide.dimensions
    except Image.DecompressionBombError as err:
        raise SlideError(f"cannot read {path.name}: {err}; an image this large belongs in a tiled pyramidal TIFF "
                         "(e.g. vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg)") from err  # fmt: skip
    except Exception as err:  # noqa: BLE001 — PIL raises several types for corrupt images
        raise SlideError(f"cannot read {path.name}: the image is truncated or corrupt ({err})") from err
    return slide


def on_white(region: Image.Image) -> Image.Image:
    """RGBA from read_region → RGB with transparent pixels (outside the scan, alpha-masked) white, not black.

    A region that is opaque throughout (nearly every tile) is only converted: compositing on a white canvas took
    27 ms of a 1,792 px tile's ~90 ms read, mostly holding the GIL, so it serialised a GPU host's reader threads;
    checking the alpha channel first takes 3 ms and releases it."""
    if region.mode != "RGBA" or region.getchannel("A").getextrema()[0] == 255:
        return region.convert("RGB")
    return Image.alpha_composite(Image.new("RGBA", region.size, (255, 255, 255, 255)), region).convert("RGB")


def slide_path(slide) -> Path | None:
    """The file an open OpenSlide/TiffSlide/ImageSlide reads (for error messages), or None."""
    name = getattr(slide, "_filename", None) or getattr(slide, "_file_arg", None)  # OpenSlide, ImageSlide
    if name is None:  # tiffslide
        name = getattr(getattr(getattr(slide, "_tifffile", None), "filehandle", None), "path", None)
    return Path(name) if isinstance(name, (str, Path)) and name else None


def read_region(slide, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
    """``slide.read_region`` as RGB on white; a decoder error becomes :func:`unreadable`'s SlideError."""
    try:
        return on_white(slide.read_region(_level_location(slide, location, level), level, size))
    except Exception as err:  # noqa: BLE001 — corrupt tiles surface as many exception types
        raise unreadable(slide_path(slide), err) from err


def _tiffslide_level(slide, level: int) -> bool:
    return level > 0 and type(slide).__module__.startswith("tiffslide")


def _level_start(slide, location: tuple[int, int], level: int) -> tuple[int, int]:
    """The level px at which :func:`read_region` of level-0 ``location`` starts: ``int(location / downsample)``
    (OpenSlide), or on tiffslide's reduced levels the nearest level px, per axis on its own scale
    (:func:`_level_location`)."""
    if not _tiffslide_level(slide, level):
        d = float(slide.level_downsamples[level])
        return int(location[0] / d), int(location[1] / d)
    (W, H), (lw, lh) = slide.dimensions, slide.level_dimensions[level]
    return round(location[0] * lw / W), round(location[1] * lh / H)


def _level_location(slide, location: tuple[int, int], level: int) -> tuple[int, int]:
    """The level-0 location to hand ``slide.read_region`` so that a region of a reduced level starts at the level
    px nearest to ``location``, per axis. tiffslide truncates location / the mean of the x and y downsamples: on a
    level whose size was rounded down (1,001 px / 4 → 250: bfconvert's and QuPath's OME-TIFF pyramids) a region
    started up to a level px above and left of where it was asked. OpenSlide places it itself."""
    if not _tiffslide_level(slide, level):
        return location
    ds = slide.level_downsamples[level]  # what tiffslide divides by
    out = []
    for target in _level_start(slide, location, level):
        loc = math.ceil(target * ds)
        while loc > 0 and int(loc / ds) > target:
            loc -= 1
        while int(loc / ds) < target:
            loc += 1
        out.append(loc)
    return out[0], out[1]


# ---------------------------------------------------------------------------------------------------------------
# microns per pixel, levels, thumbnail


PLAUSIBLE_MPP = (0.01, 50.0)  # µm/px of a microscope scan; 72 or 96 dpi (353 or 265 µm/px) are image-editor defaults


def plausible_mpp(mpp: float) -> bool:
    return PLAUSIBLE_MPP[0] < mpp < PLAUSIBLE_MPP[1]


def slide_mpp(slide, default: float | None = None) -> float:
    """Microns per pixel at level 0, from OpenSlide/tiffslide properties (TIFF resolution tags), else ``default``.
    A value no microscope gives (outside ``PLAUSIBLE_MPP``: the 72 dpi an image editor writes, which OpenSlide and
    tiffslide report as 352.8 µm/px) is not taken: it would cut the slide into 1-pixel tiles."""
    props = slide.properties
    for key in ("openslide.mpp-x", "tiffslide.mpp-x"):
        value = props.get(key)
        if value in (None, "", "0"):
            continue
        try:
            mpp = float(value)
        except ValueError:
            continue
        if not plausible_mpp(mpp):
            log.warning("%s: %s=%s µm/px is not a microscope's (image-editor resolution tags?); ignored",
                        slide_path(slide), key, value)  # fmt: skip
            continue
        _warn_non_square(slide, key, mpp)
        return mpp
    if default:
        log.warning("no microns-per-pixel in the TIFF tags; using data.default_mpp=%g", default)
        return float(default)
    raise SlideError("no microns-per-pixel in the slide's metadata (TIFF resolution tags); set data.default_mpp")


def _warn_non_square(slide, key: str, mpp_x: float) -> None:
    try:
        mpp_y = float(slide.properties.get(key.replace("mpp-x", "mpp-y")) or mpp_x)
    except ValueError:
        return
    if abs(mpp_y - mpp_x) > 0.01 * mpp_x:
        log.warning("%s: pixels are not square (%g µm wide, %g µm tall); tiles are cut as if %g µm square, so "
                    "they are %.3g× as tall as wide in µm",
                    slide_path(slide), mpp_x, mpp_y, mpp_x, mpp_y / mpp_x)  # fmt: skip


def level0_mpp(slide, override: float | None = None, default: float | None = None) -> float:
    """Level-0 µm/px: ``override`` (a slide list's mpp), else the slide's metadata (OpenSlide/tiffslide mpp, then
    the TIFF resolution tags in cm or inch, then an OME-TIFF's OME-XML), else ``default``; none of them →
    SlideError("no mpp ...")."""
    if override:
        return float(override)
    try:
        return slide_mpp(slide)
    except SlideError:
        pass
    props = slide.properties
    unit = str(props.get("tiff.ResolutionUnit", "")).lower()
    try:
        res = float(props.get("tiff.XResolution") or 0)
    except ValueError:
        res = 0.0
    per_unit = {"centimeter": 1e4, "inch": 25400.0}.get(unit)
    # 72/96 dpi are image-editor defaults, not scans: only microscope-like values count
    if per_unit and res > 0 and plausible_mpp(per_unit / res):
        return per_unit / res
    if (ome := _ome_mpp(slide_path(slide))) is not None:
        return ome
    if default:
        return float(default)
    raise SlideError(
        "no mpp: the slide's metadata has no microns per pixel (openslide.mpp-x, tiffslide.mpp-x, TIFF "
        "resolution tags or an OME-XML PhysicalSizeX); set data.default_mpp=<µm/px> (e.g. data.default_mpp=0.5 "
        "for a 20x scan) or give it a value in the mpp column of the slides= CSV"
    )


# OME's UnitsLength symbols (µm as MICRO SIGN), and the spellings other writers use for microns
_MICRONS_PER = {"µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "nm": 1e-3,
                "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4}  # fmt: skip
_TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2")


def _ome_mpp(path: Path | None) -> float | None:
    """The pixel size of an OME-TIFF's first image from its OME-XML (``PhysicalSizeX`` in its unit, µm by default),
    for files that carry it there only (tifffile writes no resolution tags unless asked); None otherwise. Any TIFF
    whose description is OME-XML counts, whatever its name (not only ``*.ome.tif``)."""
    if path is None or not path.is_file() or not path.name.lower().endswith(_TIFF_SUFFIXES):
        return None
    try:
        import xml.etree.ElementTree as ET

        import tifffile

        with tifffile.TiffFile(path) as tif:
            pixels = ET.fromstring(tif.ome_metadata or "").find("{*}Image/{*}Pixels")
        unit = pixels.get("PhysicalSizeXUnit", "µm").strip()
        mpp = float(pixels.get("PhysicalSizeX")) * _MICRONS_PER[unit if unit in _MICRONS_PER else unit.lower()]
    except Exception:  # noqa: BLE001 — no OME-XML, no pixel size, an unknown unit: no mpp from here
        return None
    return mpp if plausible_mpp(mpp) else None


def best_level(level_downsamples, downsample: float, tolerance: float = LEVEL_TOLERANCE) -> int:
    """The coarsest level whose downsample is ≤ ``downsample`` (OpenSlide's get_best_level_for_downsample, with
    ``tolerance`` so a 4.0002× level serves a 4× request)."""
    fits = [i for i, d in enumerate(level_downsamples) if d <= downsample * (1 + tolerance)]
    return max(fits, key=lambda i: level_downsamples[i]) if fits else 0


def read_thumbnail(
    slide, max_side: int = 2048, region: tuple[int, int, int, int] | None = None
) -> tuple[np.ndarray, tuple[float, float]]:
    """RGB of ``region`` (x, y, width, height in level-0 px; default the whole slide), its long side between
    ``max_side`` / 2 and ``max_side`` (or the slide's own size when it is smaller): read at the coarsest level that
    still holds ``max_side`` / 2 px (transparent → white) and shrunk by an integer factor in strips (a one-level slide
    is never read whole). Returns (image, level-0 px per image px in x, y); the image starts at the region's corner.

    Not simply the coarsest level: pyramids that halve down to one tile (vips, bfconvert and QuPath's OME-TIFF
    export) or add scaled levels (OpenSlide's NDPI: down to 1/512, MIRAX) end in levels of a few hundred px, on
    which a tile would be a pixel of the tissue mask."""
    W, H = slide.dimensions
    x, y, rw, rh = (0, 0, W, H) if region is None else (int(v) for v in region)
    whole = (x, y, rw, rh) == (0, 0, W, H)
    holds = [i for i, d in enumerate(slide.level_downsamples) if max(rw, rh) / float(d) >= max_side / 2]
    level = max(holds, key=lambda i: float(slide.level_downsamples[i])) if holds else 0
    d = float(slide.level_downsamples[level])
    w, h = slide.level_dimensions[level]
    if not whole:  # the region's size at the level, within the level
        w = max(1, min(round(rw / d), w - round(x / d)))
        h = max(1, min(round(rh / d), h - round(y / d)))
    f = max(1, math.ceil(max(w, h) / max_side))
    if f == 1:
        img = np.asarray(read_region(slide, (x, y), level, (w, h)))
    else:
        rows_per_strip = f * max(1, (32 << 20) // (4 * w * f))
        out_w = max(1, w // f)
        strips = []
        for y0 in range(0, h, rows_per_strip):
            sh = min(rows_per_strip, h - y0)
            strip = read_region(slide, (x, y + round(y0 * d)), level, (w, sh))
            strips.append(np.asarray(strip.resize((out_w, max(1, round(sh / f))), Image.BOX)))
        img = np.concatenate(strips, 0)
    if whole:
        return img, (W / img.shape[1], H / img.shape[0])
    return img, (d * w / img.shape[1], d * h / img.shape[0])  # the level's pixel pitch: the region's size rounds


# ---------------------------------------------------------------------------------------------------------------
# tiles


def read_tile_region(slide, x: int, y: int, size0: int, level: int) -> Image.Image:
    """The level-0 square (x, y, size0) read at ``level`` as RGB; what lies beyond the slide is white (padded,
    never stretched: the in-slide part is read and pasted into a white canvas of the full tile's size)."""
    d = float(slide.level_downsamples[level])
    W, H = slide.dimensions
    side = max(1, round(size0 / d))
    x0, y0 = max(int(x), 0), max(int(y), 0)
    x1, y1 = min(int(x) + size0, W), min(int(y) + size0, H)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    if x1 <= x0 or y1 <= y0:
        return canvas
    lw, lh = slide.level_dimensions[level]
    # where the in-slide part starts and ends on the canvas, each rounded once: its width rounded on its own could
    # end a pixel short of the canvas where the tile ends inside the slide (a white line through tissue)
    ox, oy = round((x0 - x) / d), round((y0 - y) / d)
    lx, ly = _level_start(slide, (x0, y0), level)
    w = min(max(1, round((x1 - x) / d) - ox), side - ox, lw - lx)
    h = min(max(1, round((y1 - y) / d) - oy), side - oy, lh - ly)
    if w <= 0 or h <= 0:
        return canvas
    if (w, h) == (side, side) and (ox, oy) == (0, 0):
        return read_region(slide, (x0, y0), level, (w, h))
    canvas.paste(read_region(slide, (x0, y0), level, (w, h)), (ox, oy))
    return canvas


def resize_tile(region: Image.Image, tile_size: int) -> np.ndarray:
    """Resize (antialiased, bicubic) to ``tile_size``² and return uint8 H×W×3."""
    if region.size != (tile_size, tile_size):
        region = region.resize((tile_size, tile_size), Image.BICUBIC, reducing_gap=None)
    return np.array(region)  # a writable copy: torch.from_numpy warns on PIL's read-only buffer


def read_tile(slide, x: int, y: int, size0: int, tile_size: int, level: int | None = None) -> np.ndarray:
    """One tile as uint8 H×W×3 at ``tile_size`` px (level: the best for the needed downsample when None)."""
    level = best_level(slide.level_downsamples, size0 / tile_size) if level is None else level
    return resize_tile(read_tile_region(slide, x, y, size0, level), tile_size)
