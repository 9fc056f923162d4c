"""Export: due actions to files and messaging tools; receipts back (see `core`, `ack`)."""

from engine.export.ack import AckResult, ack
from engine.export.core import FORMATS, ExportResult, export

__all__ = ["FORMATS", "AckResult", "ExportResult", "ack", "export"]
