"""Settings: the thresholds of the built-in models and the declared custom features.

One YAML file (`--settings`, $PLAYBOOK_SETTINGS, else ./playbook-settings.yaml if it
exists, else the defaults), validated against schemas/settings.schema.json and then
semantically: sources exist, `where` filters parse and type-check, names do not collide.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import jsonschema

from engine.catalog import BUILTIN_NAMES, source_fields, source_names
from engine.clock import get_timezone, parse_duration
from engine.conditions import (
    ConditionSyntaxError,
    check_condition,
    fields_used,
    parse_condition,
)
from engine.conditions.types import NUMBER, FieldType
from engine.errors import SettingsError, UsageError
from engine.schemas import load_schema
from engine.yamlfile import YamlDoc, load_yaml_file

if TYPE_CHECKING:
    from engine.export.model import ExportConfig

DEFAULT_SETTINGS_FILE = "playbook-settings.yaml"
AGGREGATES = ("count", "sum", "min", "max", "last")


@dataclass(frozen=True)
class CustomFeature:
    """A declared feature: one aggregate over an event source."""

    name: str
    aggregate: str
    source: str
    field: str | None
    where: str | None
    within_seconds: int | None
    type: FieldType
    description: str


def _default_export() -> ExportConfig:
    from engine.export.model import ExportConfig  # here: engine.export imports this module

    return ExportConfig()


@dataclass(frozen=True)
class Settings:
    """Model thresholds and custom features (defaults per ../shared/DOMAIN.md)."""

    timezone: str = "Asia/Shanghai"
    loyal_spend: float = 2000.0
    active_days: int = 30
    silent_days: int = 90
    sleeping_days: int = 180
    custom_features: tuple[CustomFeature, ...] = ()
    # Not hashed: its tag_ids / data dicts are not hashable, and Settings stays hashable.
    export: ExportConfig = field(default_factory=_default_export, hash=False)
    path: str | None = field(default=None, compare=False)

    @property
    def tz(self) -> ZoneInfo:
        """The store's timezone."""
        return get_timezone(self.timezone)


def settings_path(explicit: str | None) -> str | None:
    """The settings file to use: explicit, $PLAYBOOK_SETTINGS, or the default if present."""
    if explicit:
        return explicit
    env = os.environ.get("PLAYBOOK_SETTINGS")
    if env:
        return env
    return DEFAULT_SETTINGS_FILE if Path(DEFAULT_SETTINGS_FILE).is_file() else None


def load_settings(path: str | None = None) -> Settings:
    """Load and check the settings file at `path` (None: the defaults)."""
    if path is None:
        return Settings()
    try:
        doc = load_yaml_file(path)
    except Exception as exc:  # InputError from the loader already says file:line:col
        raise SettingsError(str(exc)) from exc
    data = doc.data if doc.data is not None else {}
    problems = [f"{doc.file}:{p.line}:{p.col}: {p.message}" for p in doc.problems]
    problems += _schema_problems(doc, data)
    if problems:
        raise SettingsError("\n".join(problems))
    settings, problems = _build(doc, data, path)
    if problems:
        raise SettingsError("\n".join(problems))
    return settings


def _schema_problems(doc: YamlDoc, data: Any) -> list[str]:
    validator = jsonschema.Draft202012Validator(load_schema("settings"))
    found = []
    for error in validator.iter_errors(data):
        path = tuple(error.absolute_path)
        mark = doc.mark(path)
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            known = error.schema.get("properties", {}) if isinstance(error.schema, dict) else {}
            extra = [key for key in error.instance if key not in known]
            if extra:
                mark = doc.key_mark((*path, extra[0]))
        where = ".".join(str(p) for p in path) or "(top level)"
        found.append(
            (
                mark.line,
                mark.col,
                f"{doc.file}:{mark.line}:{mark.col}: {where}: {_schema_message(error)}",
            )
        )
    return [message for _, _, message in sorted(found)]


def _schema_message(error: jsonschema.ValidationError) -> str:
    if error.validator == "additionalProperties":
        return str(error.message).replace("Additional properties are not allowed", "unknown key")
    if error.validator == "oneOf":
        return "give exactly one of count, sum, min, max or last"
    return str(error.message)


def _build(doc: YamlDoc, data: dict[str, Any], path: str) -> tuple[Settings, list[str]]:
    problems: list[str] = []

    def problem(at: tuple[str | int, ...], message: str, offset: int | None = None) -> None:
        mark = doc.mark(at) if offset is None else doc.mark_in_string(at, offset)
        problems.append(f"{doc.file}:{mark.line}:{mark.col}: {'.'.join(map(str, at))}: {message}")

    timezone = data.get("timezone", Settings.timezone)
    try:
        get_timezone(timezone)
    except UsageError as exc:
        problem(("timezone",), str(exc))
    lifecycle = data.get("lifecycle", {})
    active = lifecycle.get("active_days", Settings.active_days)
    silent = lifecycle.get("silent_days", Settings.silent_days)
    sleeping = lifecycle.get("sleeping_days", Settings.sleeping_days)
    if not active <= silent <= sleeping:
        problem(
            ("lifecycle",),
            f"need active_days <= silent_days <= sleeping_days, got {active}, {silent}, {sleeping}",
        )
    features = []
    for name, spec in data.get("features", {}).items():
        feature = _custom_feature(
            name,
            spec,
            lambda key, msg, offset=None, n=name: problem(("features", n, *key), msg, offset),
        )
        if feature is not None:
            features.append(feature)
    settings = Settings(
        timezone=timezone,
        loyal_spend=float(data.get("aipl", {}).get("loyal_spend", Settings.loyal_spend)),
        active_days=active,
        silent_days=silent,
        sleeping_days=sleeping,
        custom_features=tuple(features),
        export=_export(data.get("export", {}), problem),
        path=path,
    )
    return settings, problems


def _export(data: dict[str, Any], problem: Any) -> ExportConfig:
    """The `export:` section (already schema-checked) as an ExportConfig."""
    # Imported here: engine.export imports this module.
    from engine.export.model import (
        ExportConfig,
        SmsConfig,
        WebhookConfig,
        WechatTemplateConfig,
        WecomConfig,
    )

    wecom = data.get("wecom", {})
    sms = data.get("sms", {})
    wechat = data.get("wechat_template", {})
    webhook = data.get("webhook", {})
    region = sms.get("default_region", SmsConfig.default_region)
    if "default_region" in sms:
        import phonenumbers  # only when a region is given: the import takes a while

        if region not in phonenumbers.SUPPORTED_REGIONS:
            problem(
                ("export", "sms", "default_region"),
                f"unknown region {region!r}; use an ISO 3166 code such as CN or HK",
            )
    backoff = webhook.get("backoff", WebhookConfig.backoff)
    max_backoff = webhook.get("max_backoff", WebhookConfig.max_backoff)
    if backoff > max_backoff:
        problem(
            ("export", "webhook", "max_backoff" if "max_backoff" in webhook else "backoff"),
            f"need backoff <= max_backoff, got {backoff} and {max_backoff}",
        )
    return ExportConfig(
        wecom=WecomConfig(
            api_base=wecom.get("api_base", WecomConfig.api_base),
            token_env=wecom.get("token_env", WecomConfig.token_env),
            monthly_limit=wecom.get("monthly_limit", WecomConfig.monthly_limit),
            tag_ids=dict(wecom.get("tag_ids", {})),
        ),
        sms=SmsConfig(
            provider=sms.get("provider", SmsConfig.provider),
            sign_name=sms.get("sign_name", SmsConfig.sign_name),
            # Numeric ids may be written unquoted; the APIs take them as strings.
            template_code=str(sms.get("template_code", SmsConfig.template_code)),
            sdk_app_id=str(sms.get("sdk_app_id", SmsConfig.sdk_app_id)),
            param=sms.get("param", SmsConfig.param),
            default_region=region,
        ),
        wechat_template=WechatTemplateConfig(
            template_id=wechat.get("template_id", WechatTemplateConfig.template_id),
            url=wechat.get("url", WechatTemplateConfig.url),
            data=dict(wechat["data"]) if "data" in wechat else WechatTemplateConfig().data,
        ),
        webhook=WebhookConfig(
            secret_env=webhook.get("secret_env", WebhookConfig.secret_env),
            batch_size=webhook.get("batch_size", WebhookConfig.batch_size),
            timeout=float(webhook.get("timeout", WebhookConfig.timeout)),
            max_attempts=webhook.get("max_attempts", WebhookConfig.max_attempts),
            backoff=float(backoff),
            max_backoff=float(max_backoff),
        ),
    )


def _custom_feature(name: str, spec: dict[str, Any], problem: Any) -> CustomFeature | None:
    if name in BUILTIN_NAMES:
        problem((), f"'{name}' is a built-in field; choose another name")
        return None
    aggregate = next(a for a in AGGREGATES if a in spec)
    source = spec[aggregate]
    if source not in source_names():
        problem((aggregate,), f"unknown source {source!r}; use one of: {', '.join(source_names())}")
        return None
    where = spec.get("where")
    extra: set[str] = set()
    ok = True
    if where is not None:
        try:
            cond = parse_condition(where)
        except ConditionSyntaxError as exc:
            hint = f" ({exc.hint})" if exc.hint else ""
            problem(("where",), f"{exc.message}{hint}", exc.offset)
            return None
        extra = set(fields_used(cond))
        fields = source_fields(source, extra)
        for found in check_condition(cond, {k: v.type for k, v in fields.items()}):
            hint = f" ({found.hint})" if found.hint else ""
            problem(("where",), f"{found.message}{hint}", found.start)
            ok = False
    field_name = spec.get("field")
    fields = source_fields(source, extra | ({field_name} if field_name else set()))
    type_: FieldType = NUMBER
    if aggregate == "count":
        if field_name is not None:
            problem(("field",), "count takes no field")
            ok = False
    elif field_name is None:
        problem((), f"{aggregate} needs a field, e.g. field: amount")
        ok = False
    elif field_name not in fields:
        problem(
            ("field",), f"{source} has no field {field_name!r}; it has: {', '.join(sorted(fields))}"
        )
        ok = False
    else:
        type_ = fields[field_name].type
        if aggregate == "sum" and type_.kind != "number":
            problem(("field",), f"sum needs a number field; {field_name} is {type_.kind}")
            ok = False
    within = spec.get("within")
    within_seconds = parse_duration(within) if within else None
    if not ok:
        return None
    return CustomFeature(
        name=name,
        aggregate=aggregate,
        source=source,
        field=field_name,
        where=where,
        within_seconds=within_seconds,
        type=NUMBER if aggregate in ("count", "sum") else type_,
        description=spec.get("description") or _describe(aggregate, source, field_name, within),
    )


def _describe(aggregate: str, source: str, field_name: str | None, within: str | None) -> str:
    what = (
        f"{aggregate} of {source}"
        if field_name is None
        else f"{aggregate} {field_name} of {source}"
    )
    return what + (f" in the last {within}" if within else "")
