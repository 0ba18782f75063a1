"""Trained models applied to new slides: MIL predictions and heatmaps (:mod:`.mil`)."""
