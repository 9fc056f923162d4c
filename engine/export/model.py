"""What exporters work with: due actions as `Item`s, the export configuration, and the
requests / rejections an exporter turns them into.

An `Item` carries only what some exporter may need; each exporter declares the customer
fields it reads (`Exporter.fields`) and the selection reads no others, so a WeCom file
never holds a phone number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Customer fields an exporter may ask for (the rest of the customer row is never read).
CUSTOMER_FIELDS = ("name", "external_userid", "owner", "phone", "openid")


@dataclass(frozen=True)
class Item:
    """One due action, as an exporter sees it."""

    action_id: str
    playbook: str
    rule_id: str
    customer_id: str
    type: str  # send | invite_group | tag | task | coupon
    channel: str | None  # wecom | sms | wechat_template | webhook | None
    message: str | None
    coupon: str | None  # the coupon code
    group_name: str | None
    tags_added: tuple[str, ...]
    tags_removed: tuple[str, ...]
    assign_to: str | None  # tasks: the staff member
    note: str | None  # tasks: what to do
    scheduled_at: int
    expires_at: int | None
    # Attachments decided with the action, neutral shape:
    #   {"type": "link", "title": str, "url": str, "desc": str | None, "picurl": str | None}
    #   {"type": "miniprogram", "title": str, "appid": str, "page": str, "pic_media_id": str}
    attachments: tuple[dict[str, Any], ...] = ()
    # Customer fields: None unless the exporter declared it needs them.
    name: str | None = None
    external_userid: str | None = None
    owner: str | None = None  # the owning staff member (WeCom userid)
    phone: str | None = None
    openid: str | None = None  # official-account openid (customers.props["openid"])


@dataclass(frozen=True)
class Request:
    """One request body for a destination, and the actions it carries."""

    endpoint: str  # e.g. "externalcontact/add_msg_template", "SendBatchSms"
    body: dict[str, Any]
    action_ids: tuple[str, ...]


@dataclass(frozen=True)
class Rejection:
    """An action an exporter cannot send, and why (it is marked failed with the reason)."""

    action_id: str
    reason: str


@dataclass(frozen=True)
class WecomConfig:
    """WeCom (企业微信) customer-contact API."""

    api_base: str = "https://qyapi.weixin.qq.com/cgi-bin"
    token_env: str = "WECOM_ACCESS_TOKEN"  # the access token is read from this variable
    monthly_limit: int = 4  # mass messages a customer may receive per calendar month
    tag_ids: dict[str, str] = field(default_factory=dict)  # tag name -> WeCom tag id


@dataclass(frozen=True)
class SmsConfig:
    """An SMS platform: Aliyun SendBatchSms or Tencent Cloud SendSms."""

    provider: str = "aliyun"  # aliyun | tencent
    sign_name: str = ""
    template_code: str = ""  # Aliyun TemplateCode / Tencent TemplateId
    sdk_app_id: str = ""  # Tencent SmsSdkAppId
    param: str = "content"  # Aliyun: the TemplateParam key the message goes in
    default_region: str = "CN"  # numbers without a country code are read as this region


@dataclass(frozen=True)
class WechatTemplateConfig:
    """Official-account (公众号) template messages."""

    template_id: str = ""
    url: str | None = None
    # template data key -> text; "{message}", "{coupon}" and "{name}" are filled in
    data: dict[str, str] = field(default_factory=lambda: {"first": "{message}"})


@dataclass(frozen=True)
class WebhookConfig:
    """Signed JSON POSTs (Standard Webhooks)."""

    secret_env: str = "PLAYBOOK_WEBHOOK_SECRET"  # holds "whsec_<base64>"
    batch_size: int = 500
    timeout: float = 10.0
    max_attempts: int = 5
    backoff: float = 0.5  # first retry after about this many seconds, doubling
    max_backoff: float = 60.0


@dataclass(frozen=True)
class ExportConfig:
    """The `export:` section of the settings file."""

    wecom: WecomConfig = field(default_factory=WecomConfig)
    sms: SmsConfig = field(default_factory=SmsConfig)
    wechat_template: WechatTemplateConfig = field(default_factory=WechatTemplateConfig)
    webhook: WebhookConfig = field(default_factory=WebhookConfig)
