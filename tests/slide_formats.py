"""Slide files as other software writes them, small, for the readers' tests.

- :func:`write_leica_scn`: a Leica SCN as the scanner writes it; OpenSlide's ``leica`` driver reads it as it reads a
  real one. A BigTIFF whose first directory (the macro image of the whole glass) carries the Leica XML (namespace
  2010/10/01): the collection is the glass, the main image a scanned region of it at an offset in nm, one TIFF
  directory per pyramid level. OpenSlide shows the whole glass as the slide (``dimensions``) and the region as
  ``openslide.bounds-*`` (``openslide.region[0].*``), the glass outside the region transparent; QuPath crops the
  slide to that region. The format as OpenSlide parses it: ``src/openslide-vendor-leica.c``.
- :func:`write_ome_pyramid`: an OME-TIFF pyramid as bfconvert and QuPath's File → Export → OME-TIFF write it: the
  reduced levels in SubIFDs of the full-resolution image, physical pixel size in the OME-XML.
- :func:`write_dicom_wsi`: a DICOM slide as IDC serves it and wsidicomizer writes it: a folder holding one series of
  VL Whole Slide Microscopy Image instances (one per level, TILED_FULL, plus a LABEL image), pixel spacing in mm;
  OpenSlide 4's ``dicom`` driver reads it (``src/openslide-vendor-dicom.c``: image flavor, transfer syntax, 8-bit
  RGB, the folder scanned for the series' other files).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

NAMESPACE = "http://www.leica-microsystems.com/scn/2010/10/01"


def _settings(objective: str) -> str:
    return (
        f"<scanSettings><objectiveSettings><objective>{objective}</objective></objectiveSettings>"
        "<illuminationSettings><numericalAperture>0.7</numericalAperture>"
        "<illuminationSource>brightfield</illuminationSource></illuminationSettings></scanSettings>"
    )


def write_leica_scn(
    path: Path,
    region: np.ndarray,
    mpp: float,
    *,
    canvas: tuple[int, int],
    offset: tuple[int, int],
    levels: tuple[int, ...] = (1, 4),
    tile: int = 256,
) -> None:
    """``region`` (H×W×3 uint8, ``mpp`` µm/px) scanned at level-0 ``offset`` (x, y) on a glass of ``canvas``
    (width, height) level-0 px; levels downsampled by ``levels`` (box filter), zlib-compressed tiles."""
    h, w = region.shape[:2]
    nm = mpp * 1000
    cw, ch = round(canvas[0] * nm), round(canvas[1] * nm)
    macro = np.full((64, max(1, round(64 * canvas[0] / canvas[1])), 3), 200, np.uint8)
    dims = "".join(
        f'<dimension sizeX="{w // d}" sizeY="{h // d}" sizeZ="1" ifd="{i + 1}"/>' for i, d in enumerate(levels)
    )
    device = '<device model="Leica SCN400;Leica SCN" version="1.5"/>'
    xml = (
        f'<?xml version="1.0"?><scn xmlns="{NAMESPACE}"><collection name="glass" uuid="c" sizeX="{cw}" sizeY="{ch}">'
        "<barcode>aGlyZXNwYXRo</barcode>"
        f'<image name="macro" uuid="m">{device}'
        f'<pixels sizeX="{macro.shape[1]}" sizeY="{macro.shape[0]}">'
        f'<dimension sizeX="{macro.shape[1]}" sizeY="{macro.shape[0]}" ifd="0"/></pixels>'
        f'<view sizeX="{cw}" sizeY="{ch}" offsetX="0" offsetY="0"/>{_settings("0.15")}</image>'
        f'<image name="scan" uuid="s">{device}<pixels sizeX="{w}" sizeY="{h}">{dims}</pixels>'
        f'<view sizeX="{round(w * nm)}" sizeY="{round(h * nm)}" offsetX="{round(offset[0] * nm)}" '
        f'offsetY="{round(offset[1] * nm)}" spacingZ="0"/>{_settings("20")}</image>'
        "</collection></scn>"
    )
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(macro, tile=(64, 64), photometric="rgb", compression="zlib", description=xml, metadata=None)
        for d in levels:
            level = region if d == 1 else np.asarray(Image.fromarray(region).resize((w // d, h // d), Image.BOX))
            tif.write(level, tile=(tile, tile), photometric="rgb", compression="zlib", metadata=None,
                      resolution=(1e4 / (mpp * d), 1e4 / (mpp * d)), resolutionunit="CENTIMETER")  # fmt: skip


def write_ome_pyramid(path: Path, image: np.ndarray, mpp: float, levels: tuple[int, ...] = (1, 4), tile: int = 256):
    """``image`` (H×W×3 uint8 at ``mpp`` µm/px) and its reductions by ``levels`` (box filter) as SubIFDs."""
    h, w = image.shape[:2]
    options = dict(tile=(tile, tile), photometric="rgb", compression="zlib", resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(image, subifds=len(levels) - 1, resolution=(1e4 / mpp, 1e4 / mpp),
                  metadata={"axes": "YXS", "PhysicalSizeX": mpp, "PhysicalSizeY": mpp}, **options)  # fmt: skip
        for d in levels[1:]:
            level = np.asarray(Image.fromarray(image).resize((w // d, h // d), Image.BOX))
            tif.write(level, subfiletype=1, resolution=(1e4 / (mpp * d), 1e4 / (mpp * d)), **options)


WSM_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage


def write_dicom_wsi(
    folder: Path, image: np.ndarray, mpp: float, levels: tuple[int, ...] = (1, 4), tile: int = 256
) -> list[Path]:
    """``image`` (H×W×3 uint8 at ``mpp`` µm/px) and its reductions by ``levels`` (box filter) as one DICOM series in
    ``folder``: a VOLUME instance per level (uncompressed, explicit VR little endian, 8-bit RGB, tiles row by row,
    edge tiles padded) and a LABEL instance; returns the files, level 0 first."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    h0, w0 = image.shape[:2]
    label = np.full((64, 128, 3), 240, np.uint8)
    files = []
    for i, (flavor, d) in enumerate([("VOLUME", d) for d in levels] + [("LABEL", None)]):
        pixels = label if d is None else image
        if d not in (None, 1):
            pixels = np.asarray(Image.fromarray(image).resize((w0 // d, h0 // d), Image.BOX))
        h, w = pixels.shape[:2]
        th, tw = (tile, tile) if d is not None else (h, w)  # an associated image is one whole frame
        rows, cols = -(-h // th), -(-w // tw)
        padded = np.zeros((rows * th, cols * tw, 3), np.uint8)
        padded[:h, :w] = pixels
        frames = padded.reshape(rows, th, cols, tw, 3).transpose(0, 2, 1, 3, 4)
        instance = generate_uid()
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = WSM_SOP_CLASS, instance
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = WSM_SOP_CLASS, instance, "SM"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.PatientID = ds.PatientName = "hirespath"
        ds.InstanceNumber = i + 1
        ds.ImageType = ["ORIGINAL" if d == 1 else "DERIVED", "PRIMARY", flavor, "NONE"]
        ds.DimensionOrganizationType = "TILED_FULL"
        ds.Rows, ds.Columns = th, tw
        ds.NumberOfFrames = rows * cols
        ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows, ds.TotalPixelMatrixFocalPlanes = w, h, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        if d is not None:
            ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = w0 * mpp / 1000, h0 * mpp / 1000
            measures = Dataset()
            measures.PixelSpacing = [mpp * d / 1000, mpp * d / 1000]  # mm: rows, columns
            measures.SliceThickness = 0.001
            shared = Dataset()
            shared.PixelMeasuresSequence = Sequence([measures])
            ds.SharedFunctionalGroupsSequence = Sequence([shared])
        ds.PixelData = frames.tobytes()
        path = folder / f"{instance}.dcm"  # IDC names each instance by its SOP instance UID
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files
