"""Playbooks: load YAML, validate it against the schema and the field catalog, build the model.

check_playbook_file(path, settings) -> (Playbook | None, [Diagnostic])
load_playbook(path, settings)       -> Playbook, or raises PlaybookInvalid
"""

from engine.playbook.diagnostics import Diagnostic, has_errors
from engine.playbook.load import (
    PlaybookInvalid,
    check_playbook_file,
    load_playbook,
    playbook_files,
)
from engine.playbook.model import Action, Cap, Coupon, Group, Playbook, Rule

__all__ = [
    "Action",
    "Cap",
    "Coupon",
    "Diagnostic",
    "Group",
    "Playbook",
    "PlaybookInvalid",
    "Rule",
    "check_playbook_file",
    "has_errors",
    "load_playbook",
    "playbook_files",
]
