"""One method's evaluated results: what the harness produces and the report reads (no import between the two)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class MethodResult:
    """Test-split results of one method: metric rows (dicts with ``subject``) and the settings behind them."""

    name: str
    calibration: dict[str, Any]
    volume_rows: list[dict[str, Any]]
    slice_rows: list[dict[str, Any]]
    healthy_rows: list[dict[str, Any]]
    healthy_volume_rows: list[dict[str, Any]]
    oracle: dict[str, float]
    nfe_per_slice: float | None
    seconds_per_volume: float | None
    role: str | None = None

    @property
    def volumes_without_tumour(self) -> list[str]:
        return [row["subject"] for row in self.healthy_volume_rows]
