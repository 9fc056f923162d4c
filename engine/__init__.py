"""playbook-engine: rules and playbooks for private-domain (私域) customer operations.

The pipeline is load -> validate -> compile -> match -> decide -> enqueue -> export; this
package is the library, `engine.cli` the thin `playbook` command on top. Public API:

    open_store(path)                          the SQLite fact store
    ingest_file(store, kind, path, options)   load customers / orders / refunds / events
    load_settings(path)                       model thresholds and custom features
    build_features(store, settings, as_of)    features as of a moment, in SQL
    compute_features(...)                     the same, as a list of dicts
    field_catalog(settings)                   every field a condition may use
    build_report(store, settings, as_of)      AIPL funnel, lifecycle, RFM, health checks
"""

from engine.catalog import FieldInfo, field_catalog
from engine.errors import InputError, PlaybookError, SettingsError, StoreError, UsageError
from engine.features import FeatureTable, build_features, compute_features, iter_features
from engine.ingest import IngestOptions, IngestResult, ingest_file
from engine.report import Report, build_report
from engine.settings import CustomFeature, Settings, load_settings
from engine.store import Store, open_store

__all__ = [
    "CustomFeature",
    "FeatureTable",
    "FieldInfo",
    "IngestOptions",
    "IngestResult",
    "InputError",
    "PlaybookError",
    "Report",
    "Settings",
    "SettingsError",
    "Store",
    "StoreError",
    "UsageError",
    "build_features",
    "build_report",
    "compute_features",
    "field_catalog",
    "ingest_file",
    "iter_features",
    "load_settings",
    "open_store",
]
