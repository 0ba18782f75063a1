"""SegPath DataModule: train/val/test splits from the archives' fileinfo CSVs."""

from __future__ import annotations

import logging

import lightning as L
import pandas as pd
import torch
from torch.utils.data import DataLoader

from .samplers import evaluation_sampler
from .segpath import CELL_TYPES, SegPathDataset, collate, index_segpath

log = logging.getLogger("hirespath.segment")


class SegPathDataModule(L.LightningDataModule):
    """SegPath tiles resized to ``resolution`` and normalised with the encoder's ``mean``/``std``.

    ``conf/data/segpath.yaml`` builds it with ``hydra.utils.instantiate(cfg.data, resolution=..., mean=..., std=...)``:
    its keys are these keyword names. ``cell_types``: None = all 8 archives; ``max_items_per_type``: cap per cell
    type and split; ``balance_types``: training draws every cell type equally often; ``name`` labels the dataset.
    """

    def __init__(
        self,
        root: str,
        resolution: int,
        mean,
        std,
        batch_size: int = 2,
        num_workers: int = 0,
        cell_types=None,
        skip_bad: bool = False,
        max_items_per_type: int | None = None,
        balance_types: bool = False,
        name: str = "segpath",
    ):
        super().__init__()
        self.name = name
        cell_types = list(cell_types or CELL_TYPES)
        unknown = sorted(set(cell_types) - set(CELL_TYPES))
        if unknown:
            raise ValueError(f"data.cell_types: unknown {unknown}; choose among {list(CELL_TYPES)}")
        self.root, self.resolution, self.mean, self.std = root, resolution, tuple(mean), tuple(std)
        self.balance_types = balance_types
        self.batch_size, self.num_workers = batch_size, num_workers
        self.cell_types, self.skip_bad, self.max_items_per_type = cell_types, skip_bad, max_items_per_type
        self.rows, self.skipped = index_segpath(root, self.cell_types, skip_bad)

    def split_rows(self, name: str) -> pd.DataFrame:
        """The rows of split ``name`` a loader of it yields, in its order (at most ``max_items_per_type`` per cell
        type)."""
        rows = self.rows[self.rows.split == name]
        if self.max_items_per_type:
            rows = rows.groupby("cell_type", sort=False).head(self.max_items_per_type)
        return rows.reset_index(drop=True)

    def _split(self, name: str, train: bool = False) -> SegPathDataset:
        rows = self.split_rows(name)
        if len(rows) == 0:
            raise ValueError(f"SegPath root {self.root} has no {name!r} images")
        return SegPathDataset(rows, self.resolution, self.mean, self.std, train=train)

    def _loader(self, ds, shuffle: bool, sampler=None) -> DataLoader:
        if not shuffle and sampler is None:
            sampler = evaluation_sampler(ds)
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate,
            drop_last=False,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self):
        ds = self._split("train", train=True)
        if not self.balance_types:
            return self._loader(ds, True)
        # every cell type drawn equally often (archives differ in size several-fold); with replacement, one epoch
        # = as many draws as tiles. Under DDP Lightning wraps this sampler in a distributed one.
        counts = ds.rows.cell_type.map(ds.rows.cell_type.value_counts())
        sampler = torch.utils.data.WeightedRandomSampler(
            torch.tensor(1.0 / counts.to_numpy()), len(ds), replacement=True
        )
        return self._loader(ds, False, sampler)

    def val_dataloader(self):
        return self._loader(self._split("val"), False)

    def test_dataloader(self):
        return self._loader(self._split("test"), False)
