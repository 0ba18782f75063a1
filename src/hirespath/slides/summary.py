"""One run's summary from its workers' (the DDP ranks of a run): what ``summary.json`` says of a run."""

from __future__ import annotations

SUMMED = ("slides_done", "slides_redrawn", "slides_skipped", "tiles", "tiles_skipped", "tissue_mm2")


def merge_summaries(parts: list[dict]) -> dict:
    """The summary of one run from its workers' (the DDP ranks of a run, each through every slide): counts summed,
    per-slide lists joined, seconds the longest rank's (stage and untracked seconds summed over ranks). Each slide
    is counted once, by what some rank made of it, in this order: done or skipped by a rank, found finished, failed
    by a worker outside the run, held by one."""
    if len(parts) == 1:
        return parts[0]
    out = dict(parts[0])
    for key in SUMMED:
        out[key] = sum(p[key] for p in parts)
    out["done"] = [d for p in parts for d in p["done"]]
    out["skipped"] = [d for p in parts for d in p["skipped"]]
    counted = {d["slide"] for d in out["done"] + out["skipped"]}
    finished = {s for p in parts for s in p.get("found_finished", [])} - counted
    counted |= finished
    for key in ("failed_by_others", "held"):
        seen: dict = {}
        for p in parts:
            seen.update({d["slide"]: d for d in p[key] if d["slide"] not in counted})
        out[key] = list(seen.values())
        counted |= set(seen)
    out["found_finished"] = sorted(finished)
    out["slides_already_finished"] = len(finished)
    out["slides_locked_by_others"], out["slides_failed_by_others"] = len(out["held"]), len(out["failed_by_others"])
    out["seconds"] = max(p["seconds"] for p in parts)
    out["stage_seconds"] = {k: sum(p["stage_seconds"].get(k, 0.0) for p in parts) for k in out["stage_seconds"]}
    out["untracked_seconds"] = sum(p["untracked_seconds"] for p in parts)
    out["threads"] = [t for p in parts for t in p["threads"]]
    # each rank counted before the last of them finished
    out["slides_finished_on_disk"] = max(len(finished) + out["slides_done"],
                                         *(p.get("slides_finished_on_disk", 0) for p in parts))  # fmt: skip
    out["warnings"] = {k: [s for p in parts for s in p["warnings"].get(k, [])]
                       for k in dict.fromkeys(k for p in parts for k in p["warnings"])}  # fmt: skip
    seconds = out["seconds"]
    out["tiles_per_second"] = out["tiles"] / seconds if seconds else None
    out["tissue_mm2_per_second"] = out["tissue_mm2"] / seconds if seconds else None
    out["workers"] = [p["worker"] for p in parts]
    if "embedded" in out:  # embed_slides' name for the done list
        out["embedded"] = out["done"]
    return out
