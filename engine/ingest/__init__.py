"""Loading operators' files (CSV, JSONL) into the fact store.

`read` turns a file into numbered raw rows; `normalize` turns one raw row into a
canonical record or a rejection reason; `load` writes records in committed batches,
idempotently, and records rejects.
"""

from engine.ingest.load import IngestOptions, IngestResult, Reject, ingest_file
from engine.ingest.normalize import CANONICAL_FIELDS, KINDS

__all__ = [
    "CANONICAL_FIELDS",
    "KINDS",
    "IngestOptions",
    "IngestResult",
    "Reject",
    "ingest_file",
]
