"""Where a slide job's wall time goes: the stage names and the end-of-run table.

Wall-time stages add up to what the user waited (``untracked`` is the rest): ``startup`` (process start to the
runner: imports, model build, weights), ``setup`` (folder checks, the finished-slides scan, thread policy),
``prepare`` (waiting for a slide to be opened and its tissue grid computed — the next slide's is computed in the
background while the current one runs, so this is what was not hidden), ``read`` (waiting for tiles), ``h2d``
(host→device copies, CUDA), ``encode`` (the tile function's forward, synchronised), ``write`` (the sink),
``thumbnails`` (a slide's pictures), ``bookkeeping`` (locks and the ledger). Overlapped work is summed
apart: ``open`` and ``tissue`` in the background thread, ``reader_read`` (region read + decode) and
``reader_resize`` in the tile readers, ``write_behind`` in the writer and closer threads (``write_behind``: then
``write`` is only the time spent waiting for them).
"""

from __future__ import annotations

STAGES = ("startup", "setup", "prepare", "read", "h2d", "encode", "write", "thumbnails", "bookkeeping")
BACKGROUND = ("open", "tissue", "reader_read", "reader_resize", "write_behind")


def zero_stages() -> dict[str, float]:
    return dict.fromkeys(STAGES + BACKGROUND, 0.0)


def format_stages(stages: dict, wall: float, tiles: int, tissue_mm2: float) -> str:
    """The end-of-run table: seconds and share of the wall time per stage, then the overlapped work."""
    lines = [f"  {'stage':<14} {'seconds':>9} {'share':>7}"]
    for s in STAGES:
        lines.append(f"  {s:<14} {stages[s]:>9.2f} {stages[s] / wall if wall else 0:>7.1%}")
    untracked = wall - sum(stages[s] for s in STAGES)
    lines.append(f"  {'untracked':<14} {untracked:>9.2f} {untracked / wall if wall else 0:>7.1%}")
    lines.append(f"  {'wall':<14} {wall:>9.2f}")
    lines.append("  overlapped: " + ", ".join(f"{s} {stages[s]:.2f} s" for s in BACKGROUND))
    if wall:
        lines.append(f"  {tiles / wall:.2f} tiles/s, {tissue_mm2 / wall:.3f} tissue mm²/s end to end")
    return "\n".join(lines)
