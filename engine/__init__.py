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
    load_playbook(path, settings)             a validated playbook
    run_playbooks(store, settings, playbooks, as_of=...)
                                              match, decide, queue -> [RunResult]
    explain_customer(store, settings, playbook, customer, as_of)
                                              why a customer did or did not get it
    dry_run(db, settings, playbooks, steps)   what playbooks would have done -> DryRun
    export_actions(store, settings, to, out=... | url=...)
                                              due actions to a file or tool -> ExportResult
    ack_receipts(store, path)                 import delivery receipts -> AckResult
"""

from engine.catalog import FieldInfo, field_catalog
from engine.dryrun import DryRun, dry_run, steps_between
from engine.errors import InputError, PlaybookError, SettingsError, StoreError, UsageError
from engine.explain import Explanation
from engine.explain import explain as explain_customer
from engine.export import AckResult, ExportResult
from engine.export import ack as ack_receipts
from engine.export import export as export_actions
from engine.features import FeatureTable, build_features, compute_features, iter_features
from engine.ingest import IngestOptions, IngestResult, ingest_file
from engine.playbook import Playbook, load_playbook
from engine.report import Report, build_report
from engine.run import RunResult, run_playbooks
from engine.settings import CustomFeature, Settings, load_settings
from engine.store import Store, open_store

__all__ = [
    "AckResult",
    "CustomFeature",
    "DryRun",
    "Explanation",
    "ExportResult",
    "FeatureTable",
    "FieldInfo",
    "IngestOptions",
    "IngestResult",
    "InputError",
    "Playbook",
    "PlaybookError",
    "Report",
    "RunResult",
    "Settings",
    "SettingsError",
    "Store",
    "StoreError",
    "UsageError",
    "ack_receipts",
    "build_features",
    "build_report",
    "compute_features",
    "dry_run",
    "explain_customer",
    "export_actions",
    "field_catalog",
    "ingest_file",
    "iter_features",
    "load_playbook",
    "load_settings",
    "open_store",
    "run_playbooks",
    "steps_between",
]
