"""Everything about reading whole slides, below the tasks that use them (embedding, MIL, PANDA ROIs).

- :mod:`~hirespath.wsi.reader`: open a slide (OpenSlide, tiffslide), its µm/px and levels, read thumbnails and
  tiles; unreadable slides raise :class:`~hirespath.wsi.reader.SlideError` with the reason in the user's words.
- :mod:`~hirespath.wsi.listing`: which slides a run processes (a folder, or a CSV with an optional mpp column).
- :mod:`~hirespath.wsi.tissue`: tissue detection and the tile grid at a target µm/px (TRIDENT's grid).
- :mod:`~hirespath.wsi.tile_readers`: a slide's tiles streamed by reader threads or DataLoader workers.
- :mod:`~hirespath.wsi.rois`: PANDA's square fields of view.
- :mod:`~hirespath.wsi.trident_h5`: the one module that writes and reads TRIDENT/CLAM feature and patches h5 files.

Submodules are imported where used (h5py, torch and tiffslide are loaded only by the parts that need them).
"""
