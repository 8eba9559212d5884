"""Dataset problems: raised naming the file and the id, or skipped and counted (never dropped)."""

from __future__ import annotations

from storygpt.data.records import ReadReport, Skip


class DatasetError(ValueError):
    def __init__(self, file: str, item_id: str | None, reason: str):
        self.file, self.item_id, self.reason = file, item_id, reason
        where = f"{file}" + (f" [id {item_id}]" if item_id else "")
        super().__init__(f"{where}: {reason}")


class Problems:
    """Applies the ``on_error`` policy: 'raise' stops at the first problem, 'skip' records it."""

    def __init__(self, report: ReadReport, on_error: str):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error: expected 'raise' or 'skip', got {on_error!r}")
        self.report, self.on_error = report, on_error

    def __call__(self, file: str, item_id: str | None, reason: str) -> None:
        if self.on_error == "raise":
            raise DatasetError(file, item_id, reason)
        self.report.skipped.append(Skip(item_id or "", file, reason))
