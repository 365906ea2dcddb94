"""The data catalogue: every path the pipeline reads or writes under ``data.root``, named in one place.

    <root>/raw/<source>/<SYMBOL>_<TF>.parquet          candles as fetched (ingest)
    <root>/validated/<source>/<SYMBOL>_<TF>.parquet    candles that passed validation: all later steps read these
    <root>/quarantine/<source>/<SYMBOL>_<TF>.<sha12>.parquet (+ .md)   candles that failed
    <root>/reports/validation/<source>/<SYMBOL>_<TF>.{json,md}        the last check of each dataset
    <root>/derived/<step>/<key>/                       step outputs named by their inputs (levels, features, ...)
    <root>/optuna/optuna.db                            Optuna studies (unless ``tuning.storage`` names another)
    <root>/.locks/...                                  inter-process lock files (empty; never deleted)

Steps ask the catalogue for a location instead of joining paths themselves, so a layout change is one edit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pricelevel.core.cache import DerivedStore
from pricelevel.core.locks import FileLock
from pricelevel.data.folder import CandleFolder
from pricelevel.data.store import CandleStore, DatasetKey, Layer


@dataclass(frozen=True)
class DataCatalogue:
    """The paths of one store root; ``source`` names the candle source whose layers the pipeline reads."""

    root: Path
    source: str

    @property
    def store(self) -> CandleStore:
        return CandleStore(self.root)

    @property
    def derived(self) -> DerivedStore:
        return DerivedStore(self.root)

    def layer_dir(self, layer: Layer, source: str | None = None) -> Path:
        return self.store.layer_dir(layer, source or self.source)

    def validated(self) -> CandleFolder:
        """The only candles training, scoring and trading read: those that passed validation."""
        return CandleFolder.open(self.layer_dir(Layer.VALIDATED))

    def quarantine(self, key: DatasetKey, sha256: str) -> Path:
        return self.layer_dir(Layer.QUARANTINE, key.source) / f"{key.filename.removesuffix('.parquet')}.{sha256[:12]}.parquet"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports" / "validation"

    def validation_reports(self, key: DatasetKey) -> tuple[Path, Path]:
        """``(json, markdown)`` report of the last validation of ``key``."""
        stem = self.reports_dir / key.source / key.filename.removesuffix(".parquet")
        return stem.with_suffix(".json"), stem.with_suffix(".md")

    def optuna_storage(self, configured: str | None = None) -> str:
        """``tuning.storage`` when set, else the project's SQLite study database."""
        return configured or f"sqlite:///{self.root / 'optuna' / 'optuna.db'}"

    def tuning_places(self, configured: str | None = None) -> tuple[str, Path]:
        """Where a study lives and where its trials write: the same for the study and every trial worker."""
        return self.optuna_storage(configured), self.derived.folder("trials", "")

    def lock(self, *parts: str, timeout_s: float | None = None) -> FileLock:
        """An inter-process lock named by ``parts`` (e.g. ``("raw", "bybit", "BTCUSDT_1h")``)."""
        return FileLock(self.root.joinpath(".locks", *parts).with_suffix(".lock"), timeout_s)
