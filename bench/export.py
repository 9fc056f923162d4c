"""Benchmark: `engine.export.export` of a million pending actions to a WeCom request file
and to a local webhook receiver, against a bare SELECT-and-write of the same rows.

    .venv/bin/python bench/export.py                      # 1,000,000 actions, 500,000 customers
    .venv/bin/python bench/export.py --actions 20000      # quick

The store (generated once under bench/out/, reused while its spec - sizes, seed, generator
version - matches the one recorded in its `meta` table; --regenerate rebuilds it) holds
--customers customers (default: half of --actions) and --actions pending queue rows, as
`playbook run` would have left them:

  customers  name, external_userid, owner (one of 50 staff members), phone, props with an
             openid;
  actions    each for a random customer (about 2 per customer, Poisson-like), inserted
             with executemany in committed batches of 50,000: ~80% `send` on channel
             wecom, its message from 36 templates (12 of them personalised with the
             customer's name, so those messages are all different; ~40% with a coupon
             code and its link attachment), ~10% `invite_group` (channel wecom, a group's
             join link as attachment), ~10% `tag` (channel NULL, tags_added such as
             "vip", a few with tags_removed). Every action is due: scheduled_at up to two
             days before NOW, expires_at NULL or days after NOW, status 'pending'.

Each measurement runs in a fresh interpreter (its peak RSS is its own), the OS page cache
warmed beforehand, every export on a fresh copy of the store (checkpointed, then copied):

  baseline    the bare cost of the same work with nothing of the exporter's: one SELECT
              of the due rows joined to their customers' name, external_userid and owner
              (no ORDER BY), fetched in chunks of 5,000, each row written as a JSON line
              to a file, then fsynced. Run before and after the exports; the best is the
              figure.
  wecom-file  `export(store, settings, "wecom", out=FILE, now=NOW)`, settings mapping
              every tag used to a WeCom tag id (export.wecom.tag_ids) and a monthly limit
              of 1,000,000 (nothing suppressed): snapshot sorted by sender and message,
              add_msg_template tasks and mark_tag calls as JSON lines, fsync, rename,
              queue rows -> exported. Verified: every action exported, and the action ids
              in the file are the exported ones (count and checksum).
  webhook     `export(store, settings, "webhook", url=URL, now=NOW, env={secret})` with
              the default batch_size (500; --batch-size to change), posted over HTTP/1.1
              keep-alive to a receiver on 127.0.0.1 that runs in its own process (its
              memory and CPU are not the exporter's) and answers 200 to every POST at
              once. The receiver counts requests, bytes and actions (the action ids in
              each body, with a checksum), and on every 100th request (the first
              included) checks the Standard Webhooks signature with its own HMAC code and
              the body's JSON. Verified: every action sent, and the receiver got exactly
              the sent action ids (count and checksum), once each.

For each export: seconds, actions/second, batches, peak RSS (ru_maxrss; VmHWM as a
cross-check), RSS at every tenth of the actions read, CPU seconds, and its parts (timed by
wrapping the exporter's functions; the wrappers, one per batch and one per action read,
cost well under 1%). The ratio wecom-file / baseline is reported for scale. Target: peak
RSS <= 512 MiB in each export phase (the export streams: nothing holds all the actions).

The receiver's figures (requests, actions, CPU, peak RSS as VmHWM) are its own. The
written files (bench/out/export-*.jsonl) are deleted after their checks unless
--keep-output. An export that passes --time-limit (default 1800 s) is stopped; the figures
then say where it was. The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import random
import re
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import features as features_bench
import run as run_bench
from _common import (
    OUT_DIR,
    Figures,
    Params,
    add_phase_arguments,
    current_rss_mib,
    emit_json,
    engine_revision,
    io_mib,
    log,
    peak_rss_mib,
    remove_db,
    run_context,
    run_phase_here,
    run_phase_in_child,
    vm_hwm_mib,
    warm_file,
    warn_if_busy,
)

# The engine is imported only inside the phases, which run in child processes: the
# parent stays small so it cannot inflate any child's peak RSS.

SCRIPT = Path(__file__).resolve()
GENERATOR_VERSION = 1  # bump when the generated rows change, so stale stores are rebuilt
SEED = 20250104
NOW_TEXT = "2025-01-01T00:00:00+08:00"
NOW = 1_735_660_800  # the exports' `now`
DAY = 86_400
BATCH = 50_000  # rows per committed executemany while generating
READ_CHUNK = 5_000  # the baseline's fetchmany (the exporter reads its snapshot in 5,000s)
RSS_TARGET_MIB = 512
DEFAULT_TIME_LIMIT = 1800.0
DEFAULT_BATCH_SIZE = 500  # export.webhook.batch_size's default
MONTHLY_LIMIT = 1_000_000  # export.wecom.monthly_limit: high enough that nothing is suppressed
SECRET_ENV = "BENCH_EXPORT_WEBHOOK_SECRET"  # the parent's random secret, for both children
SAMPLE_EVERY = 100  # the receiver checks signature and JSON of every 100th request
SEND_SHARE, INVITE_SHARE = 0.80, 0.10  # the rest are tag actions
COUPON_SHARE = 0.4  # of all sends carry a coupon code and its link (from the texts that have one)
NO_EXPIRY_SHARE = 0.3

STAFF = tuple(
    f"{surname}{given}"
    for surname in ("zhang", "wang", "li", "liu", "chen", "yang", "huang", "zhao", "wu", "zhou")
    for given in ("wei", "fang", "na", "min", "jing")
)
SURNAMES = features_bench.SURNAMES
GIVEN = features_bench.GIVEN
CHANNELS = features_bench.CHANNELS
# (playbook, rule, message with {amount} and maybe {name}, coupon code prefix or None)
SEND_TEXTS = (
    (
        "lifecycle",
        "welcome",
        "欢迎加入我们的会员大家庭！新人专享{amount}元无门槛券已放入您的账户，7天内有效，"
        "点击下方链接即可使用。",
        "NEW",
    ),
    (
        "lifecycle",
        "second-order",
        "感谢您的第一次购买！第二单立减{amount}元，搭配您上次买的单品更划算，库存有限。",
        "REPEAT",
    ),
    (
        "lifecycle",
        "win-back",
        "好久不见，我们为您准备了一份回归礼：全场满299减{amount}，本周日前有效。",
        "BACK",
    ),
    (
        "lifecycle",
        "sleeping",
        "{name}，您已经很久没来看看了，新品已经到店，老朋友专享{amount}元券等您来领。",
        "SLEEP",
    ),
    (
        "rfm",
        "champions-thanks",
        "{name}您好，感谢您一直以来的支持！作为我们的核心会员，本月可到店领取价值{amount}0元的"
        "护肤礼盒一份。",
        None,
    ),
    (
        "rfm",
        "at-risk",
        "最近天气转凉，换季护肤正当时，精华系列满{amount}0元享八折，回复1了解详情。",
        None,
    ),
    (
        "rfm",
        "new-customers",
        "您的订单已签收，使用中有任何问题随时找我。关注公众号，每周三都有{amount}元新人福利。",
        None,
    ),
    (
        "aipl",
        "a-to-i",
        "本周直播间下单满{amount}0元送小样三件套，主播现场试色，记得准时来看哦～",
        None,
    ),
    (
        "aipl",
        "i-to-p",
        "{name}，您加购的商品正在参加满减活动，立减{amount}元，库存不多，先到先得。",
        "CART",
    ),
    (
        "membership",
        "member-renew",
        "您的年度会员还有7天到期，现在续费立享{amount}元返券，会员权益不间断。",
        "RENEW",
    ),
    (
        "membership",
        "birthday",
        "{name}，生日快乐！🎂 生日月专属{amount}元礼券已经到账，祝您天天开心。",
        "BDAY",
    ),
    (
        "vip-referral",
        "refer-a-friend",
        "邀请好友完成首单，您和好友各得{amount}元券，多邀多得，上不封顶。",
        "FRIEND",
    ),
)
AMOUNTS = (10, 20, 30)  # three variants of each text: 36 templates
# A send from a text with a coupon carries it this often: COUPON_SHARE of all sends.
COUPON_GIVEN_PREFIX = COUPON_SHARE * len(SEND_TEXTS) / sum(1 for t in SEND_TEXTS if t[3])
# (playbook, rule, group, message) for invite_group
INVITES = (
    (
        "aipl",
        "i-invite-newcomers",
        "new-member-welcome",
        "新人福利群每天10点发券，点击链接加入，群里还有护肤顾问答疑～",
    ),
    (
        "aipl",
        "l-invite-vip-club",
        "vip-club",
        "诚邀您加入VIP俱乐部群：专属客服、新品首发、会员价提前享。",
    ),
    (
        "lifecycle",
        "third-order-invite",
        "vip-club",
        "{name}，恭喜成为我们的老顾客！邀请您加入VIP群，专属福利不错过。",
    ),
    (
        "membership",
        "member-welcome",
        "member-club",
        "会员专属群已开通，每月会员日的活动都会第一时间在群里通知。",
    ),
)
GROUPS = {
    "new-member-welcome": ("新人福利群", "https://work.weixin.qq.com/gm/4f1e0d2c9a8b7c6d"),
    "vip-club": ("VIP俱乐部", "https://work.weixin.qq.com/gm/9a8b7c6d5e4f3a2b"),
    "member-club": ("会员专属群", "https://work.weixin.qq.com/gm/1a2b3c4d5e6f7a8b"),
}
# (playbook, rule, tags_added, tags_removed) for tag actions
TAG_ACTIONS = (
    ("lifecycle", "loyal-thank-you", "vip", None),
    ("lifecycle", "third-order-invite", "vip-candidate", None),
    ("aipl", "l-invite-vip-club", "vip-club-invited", "near-loyal"),
    ("membership", "member-welcome", "member", None),
    ("membership", "birthday", "birthday-this-month", None),
)
TAG_IDS = {  # every tag the tag actions add or remove -> a WeCom tag id
    tag: "et" + hashlib.sha256(tag.encode()).hexdigest()[:20]
    for _playbook, _rule, *tags in TAG_ACTIONS
    for tag in tags
    if tag is not None
}
ACTION_COLUMNS = (
    "action_id",
    "run_id",
    "playbook",
    "playbook_version",
    "playbook_hash",
    "rule_id",
    "customer_id",
    "trigger",
    "action_index",
    "type",
    "channel",
    "template",
    "message",
    "coupon",
    "group_name",
    "tags_added",
    "tags_removed",
    "decided_at",
    "scheduled_at",
    "expires_at",
    "status",
    "attachments",
)
INSERT_ACTION = (
    f"INSERT INTO actions ({', '.join(ACTION_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in ACTION_COLUMNS)})"
)
INSERT_CUSTOMER = (
    "INSERT INTO customers (customer_id, name, external_userid, owner, phone, joined_at, "
    "channel, props) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)
DUE_WHERE = (
    "a.status = 'pending' AND a.scheduled_at <= :now "
    "AND (a.expires_at IS NULL OR a.expires_at > :now)"
)
BASELINE_SQL = (
    "SELECT a.action_id, a.playbook, a.rule_id, a.customer_id, a.type, a.channel, "
    "a.message, a.coupon, a.group_name, a.tags_added, a.tags_removed, a.attachments, "
    "a.scheduled_at, a.expires_at, c.name, c.external_userid, c.owner "
    f"FROM actions a JOIN customers c ON c.customer_id = a.customer_id WHERE {DUE_WHERE}"
)
ACTION_ID_IN_BODY = re.compile(rb'"action_id":"([0-9a-f]+)"')


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Benchmark export to a WeCom file and to a webhook against a bare read."
    )
    parser.add_argument("--actions", type=int, default=1_000_000, help="pending actions")
    parser.add_argument(
        "--customers", type=int, default=None, help="default: half the actions (500,000 at 1M)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help="export.webhook.batch_size (default %(default)s, the engine's default)",
    )
    parser.add_argument(
        "--time-limit",
        type=float,
        default=DEFAULT_TIME_LIMIT,
        help="stop an export after this many seconds (default %(default)s)",
    )
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="where stores and files go")
    parser.add_argument("--regenerate", action="store_true", help="rebuild the store")
    parser.add_argument(
        "--keep-output", action="store_true", help="keep the written files (deleted otherwise)"
    )
    add_phase_arguments(parser)
    args = parser.parse_args()
    if args.phase:
        # run_bench.start_watchdog writes a stopped export's figures to this file.
        run_bench._RESULT_FILE = args.result_file
        run_phase_here(
            args,
            {
                "generate": phase_generate,
                "baseline": phase_baseline,
                "export": phase_export,
                "receiver": phase_receiver,
            },
        )
        return
    run_benchmark(args)


# --------------------------------------------------------------------------- parent


def run_benchmark(args: argparse.Namespace) -> None:
    customers = args.customers if args.customers is not None else max(1, args.actions // 2)
    if args.actions < 1 or customers < 1:
        raise SystemExit("--actions and --customers must be at least 1")
    if args.batch_size < 1:
        raise SystemExit("--batch-size must be at least 1")
    revision = engine_revision()
    machine_start = warn_if_busy("at the start")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    spec = {
        "generator": GENERATOR_VERSION,
        "seed": SEED,
        "now": NOW,
        "actions": args.actions,
        "customers": customers,
        "staff": len(STAFF),
        "shares": {"send": SEND_SHARE, "invite_group": INVITE_SHARE, "coupon": COUPON_SHARE},
    }
    db = out / f"export-a{args.actions}-c{customers}.db"
    log(
        f"export benchmark: {args.actions:,} pending actions, {customers:,} customers, "
        f"now {NOW_TEXT} ({NOW}); store {db}"
    )
    generation: Figures | None = None
    reused = not args.regenerate and features_bench.stored_meta(db, "bench_export_spec") == spec
    if reused:
        log("store already generated with this spec: reused (use --regenerate to rebuild)")
    else:
        log("generating the store (not part of the figures) ...")
        generation = run_phase_in_child(SCRIPT, "generate", {"db": str(db), "spec": spec})
        log(
            f"generated in {generation['seconds']:.1f}s (peak RSS {generation['peak_rss_mib']} MiB)"
        )
    checkpoint(db)
    counts = queue_counts(db)
    shape = features_bench.stored_meta(db, "bench_export_shape") or {}
    due = counts["due"]
    log(
        f"rows: customers {counts['customers']:,}, actions {counts['actions']:,} "
        f"({due:,} due and pending)"
    )
    log("mix: " + ", ".join(f"{k} {v:,}" for k, v in shape.items() if isinstance(v, int)))
    log(f"store file {db.stat().st_size / 2**20:,.0f} MiB; warming the OS page cache ...")
    log(f"read it in {warm_file(db):.1f}s")

    os.environ[SECRET_ENV] = "whsec_" + base64.b64encode(os.urandom(32)).decode("ascii")
    work = out / "export-work.db"
    baselines: list[Figures] = []
    log("baseline (1 of 2): SELECT the due rows with their customers, write JSON lines ...")
    baselines.append(run_baseline(db, out, args.keep_output))

    log("wecom-file: export(to='wecom', out=FILE) on a fresh copy of the store ...")
    wecom_out = out / "export-wecom.jsonl"
    fresh_copy(db, work)
    wecom_out.unlink(missing_ok=True)
    wecom = run_phase_in_child(
        SCRIPT,
        "export",
        {
            "db": str(work),
            "to": "wecom",
            "out": str(wecom_out),
            "expected": due,
            "batch_size": args.batch_size,
            "time_limit": args.time_limit,
        },
    )
    drop_copy(work)
    for temp in out.glob(f".{wecom_out.name}.*.tmp"):  # left by a stopped export
        temp.unlink()
    if not args.keep_output:
        wecom_out.unlink(missing_ok=True)
    report_export("wecom-file", wecom)

    log("webhook: export(to='webhook', url=...) to a receiver in its own process ...")
    fresh_copy(db, work)
    webhook, receiver = run_webhook(work, due, args)
    drop_copy(work)
    report_export("webhook", webhook)
    report_receiver(receiver)

    log("baseline (2 of 2) ...")
    baselines.append(run_baseline(db, out, args.keep_output))

    figures = summarise(
        args, db, counts, spec, shape, reused, generation, baselines, wecom, webhook, receiver
    )
    figures.update(run_context(revision, machine_start))
    emit_json(figures)


def checkpoint(db: Path) -> None:
    """Everything in the main file (an empty WAL), so a plain file copy is the whole store."""
    conn = sqlite3.connect(db)
    try:
        busy, _log, _done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        conn.close()
    if busy:
        raise SystemExit(f"{db}: could not checkpoint (another connection is using it)")


def fresh_copy(db: Path, work: Path) -> None:
    drop_copy(work)
    start = time.perf_counter()
    shutil.copyfile(db, work)
    log(f"  copied the store in {time.perf_counter() - start:.1f}s")


def drop_copy(work: Path) -> None:
    remove_db(work)
    Path(f"{work}.export-lock").unlink(missing_ok=True)


def run_baseline(db: Path, out: Path, keep: bool) -> Figures:
    target = out / "export-baseline.jsonl"
    result = run_phase_in_child(SCRIPT, "baseline", {"db": str(db), "out": str(target)})
    if not keep:
        target.unlink(missing_ok=True)
    log(
        f"  baseline: {result['rows']:,} rows in {result['seconds']:.2f}s = "
        f"{result['rows'] / result['seconds']:,.0f} rows/s, {result['file_mib']} MiB written, "
        f"peak RSS {result['peak_rss_mib']} MiB"
    )
    return result


def run_webhook(work: Path, due: int, args: argparse.Namespace) -> tuple[Figures, Figures]:
    """The receiver in its own process (started directly, so it is known as ours), then
    the exporter in a fresh one; the receiver stops when its stdin is closed."""
    with tempfile.TemporaryDirectory(prefix="bench-receiver-") as tmp:
        port_file = Path(tmp) / "port"
        result_file = Path(tmp) / "result.json"
        command = [
            sys.executable,
            str(SCRIPT),
            "--phase",
            "receiver",
            "--phase-params",
            json.dumps({"port_file": str(port_file)}),
            "--result-file",
            str(result_file),
        ]
        sys.stdout.flush()
        receiver = subprocess.Popen(command, stdin=subprocess.PIPE)
        try:
            port = wait_for_port(port_file, receiver)
            url = f"http://127.0.0.1:{port}/hooks/playbook"
            log(f"  receiver listening on {url} (pid {receiver.pid})")
            exported = run_phase_in_child(
                SCRIPT,
                "export",
                {
                    "db": str(work),
                    "to": "webhook",
                    "url": url,
                    "expected": due,
                    "batch_size": args.batch_size,
                    "time_limit": args.time_limit,
                },
            )
        finally:
            assert receiver.stdin is not None
            receiver.stdin.close()
            try:
                receiver.wait(timeout=60)
            except subprocess.TimeoutExpired:
                log("  WARNING: the receiver did not stop within 60s: killed")
                receiver.kill()
                receiver.wait()
        if receiver.returncode != 0 or not result_file.exists():
            raise SystemExit(f"the receiver failed (exit status {receiver.returncode})")
        received: Figures = json.loads(result_file.read_text(encoding="utf-8"))
    return exported, received


def wait_for_port(port_file: Path, process: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if port_file.exists():
            return int(port_file.read_text(encoding="ascii"))
        if process.poll() is not None:
            raise SystemExit(f"the receiver exited with status {process.returncode}")
        time.sleep(0.05)
    raise SystemExit("the receiver did not start listening within 60s")


def report_export(label: str, result: Figures) -> None:
    moved = result["moved"]
    if result.get("stopped"):
        log(f"{label} STOPPED after {result['seconds']:.1f}s: {result['stopped']}")
        log(f"  {result.get('actions_read', 0):,} actions read so far")
    else:
        rate = moved / result["seconds"] if result["seconds"] else 0.0
        what = f"{result['batches']:,} batches" + (
            f", {result['file_lines']:,} requests in a {result['file_mib']} MiB file"
            if "file_lines" in result
            else ""
        )
        log(
            f"{label}: {moved:,} actions in {result['seconds']:.2f}s = {rate:,.0f} actions/s "
            f"({what}; failed {result['failed']:,}, suppressed {result['suppressed']:,}, "
            f"expired {result['expired']:,})"
        )
    parts = ", ".join(f"{k} {v:.2f}s" for k, v in result["parts_s"].items())
    log(f"  parts: {parts}")
    log(
        f"  peak RSS {result['peak_rss_mib']} MiB (VmHWM {result['vm_hwm_mib']} MiB, "
        f"{result['rss_before_export_mib']} MiB before the export); CPU {result['cpu_s']:.1f}s"
    )
    if "statuses_after" in result:
        log(f"  queue after: {result['statuses_after']}")
    for check, ok in result.get("checks", {}).items():
        log(f"  check {check}: {'ok' if ok else 'FAILED'}")


def report_receiver(received: Figures) -> None:
    log(
        f"receiver: {received['requests']:,} requests, {received['actions']:,} actions, "
        f"{received['bytes'] / 2**20:,.1f} MiB; {received['signatures_checked']} signatures "
        f"checked, {received['signature_failures']} bad; {received['duplicate_ids']} "
        f"repeated webhook-ids; CPU {received['cpu_s']:.1f}s, peak RSS "
        f"{received['peak_rss_mib']} MiB"
    )


def summarise(
    args: argparse.Namespace,
    db: Path,
    counts: dict[str, int],
    spec: dict[str, Any],
    shape: dict[str, Any],
    reused: bool,
    generation: Figures | None,
    baselines: list[Figures],
    wecom: Figures,
    webhook: Figures,
    receiver: Figures,
) -> Figures:
    due = counts["due"]
    best = min(baselines, key=lambda b: b["seconds"])
    baseline_rate = best["rows"] / best["seconds"]
    log(
        f"baseline best {best['seconds']:.2f}s = {baseline_rate:,.0f} rows/s "
        f"(runs: {', '.join(format(b['seconds'], '.2f') for b in baselines)})"
    )

    def rate(result: Figures) -> float | None:
        return None if result.get("stopped") else result["moved"] / result["seconds"]

    wecom_rate, webhook_rate = rate(wecom), rate(webhook)
    ratio = wecom["seconds"] / best["seconds"]
    bound = "at least " if wecom.get("stopped") else ""
    log(f"wecom-file / baseline: {bound}{ratio:.2f}x the time")
    webhook_ratio = webhook["seconds"] / best["seconds"]
    bound = "at least " if webhook.get("stopped") else ""
    log(f"webhook / baseline: {bound}{webhook_ratio:.2f}x the time")

    wecom_ok = not wecom.get("stopped") and all(wecom["checks"].values())
    receiver_ok = (
        receiver["actions"] == due
        and receiver["requests"] == webhook.get("batches")
        and receiver["checksum"] == webhook.get("checksum_db")
        and receiver["duplicate_ids"] == 0
        and receiver["signature_failures"] == 0
        and receiver["sample_mismatches"] == 0
    )
    webhook_ok = not webhook.get("stopped") and all(webhook["checks"].values()) and receiver_ok
    if webhook.get("stopped"):
        log("receiver: not checked against the queue (the webhook export was stopped)")
    else:
        verdict = "yes" if receiver_ok else "NO"
        log(f"receiver got every sent action once, signed correctly: {verdict}")
    meets: dict[str, bool] = {}
    for label, result in (("wecom_file", wecom), ("webhook", webhook)):
        peak = result["peak_rss_mib"]
        meets[label] = peak <= RSS_TARGET_MIB
        verdict = "met" if meets[label] else "MISSED"
        log(f"target peak RSS <= {RSS_TARGET_MIB} MiB, {label}: {peak} MiB - {verdict}")

    def phase(result: Figures, actions_per_s: float | None) -> Figures:
        keep = {k: v for k, v in result.items() if k not in ("moved", "checksum_db")}
        return {
            "seconds": round(result["seconds"], 3),
            "actions": result["moved"],
            "actions_per_s": None if actions_per_s is None else round(actions_per_s),
            **{k: v for k, v in keep.items() if k != "seconds"},
        }

    return {
        "benchmark": "export",
        "actions": counts["actions"],
        "due_actions": due,
        "customers": counts["customers"],
        "now": NOW_TEXT,
        "store": str(db),
        "store_mib": round(db.stat().st_size / 2**20, 1),
        "store_reused": reused,
        "store_spec": spec,
        "generation_s": None if generation is None else round(generation["seconds"], 2),
        "data_shape": shape,
        "time_limit_s": args.time_limit,
        "webhook_batch_size": args.batch_size,
        "baseline_s": round(best["seconds"], 3),
        "baseline_s_runs": [round(b["seconds"], 3) for b in baselines],
        "baseline_rows": best["rows"],
        "baseline_rows_per_s": round(baseline_rate),
        "baseline_file_mib": best["file_mib"],
        "baseline_peak_rss_mib": max(b["peak_rss_mib"] for b in baselines),
        "baseline_note": "one SELECT of the due actions joined to customers (name, "
        "external_userid, owner), no ORDER BY, fetchmany(5000), json.dumps of each row as a "
        "dict to a JSON-lines file, fsync; read-only, nothing written back to the store",
        "wecom_file": phase(wecom, wecom_rate),
        "webhook": phase(webhook, webhook_rate),
        "receiver": receiver,
        "ratio_wecom_file_s_to_baseline_s": round(ratio, 3),
        "ratio_webhook_s_to_baseline_s": round(webhook_ratio, 3),
        "ratios_are_lower_bounds": bool(wecom.get("stopped") or webhook.get("stopped")),
        "rss_target_mib": RSS_TARGET_MIB,
        "meets_rss_target_wecom_file": meets["wecom_file"],
        "meets_rss_target_webhook": meets["webhook"],
        "meets_rss_target": all(meets.values()),
        "verified_wecom_file": wecom_ok,
        "verified_webhook": webhook_ok,
        "rss_method": "ru_maxrss (RUSAGE_SELF) of each exporting child process, started via "
        "/bin/sh so it does not inherit the parent's peak, taken right after export() "
        "returns (the verification reads come after); vm_hwm is a cross-check; the "
        "receiver is a separate process",
        "parent_peak_rss_mib": peak_rss_mib(),
    }


def queue_counts(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
    try:
        return {
            "customers": int(conn.execute("SELECT count(*) FROM customers").fetchone()[0]),
            "actions": int(conn.execute("SELECT count(*) FROM actions").fetchone()[0]),
            "due": int(
                conn.execute(
                    f"SELECT count(*) FROM actions a WHERE {DUE_WHERE}", {"now": NOW}
                ).fetchone()[0]
            ),
        }
    finally:
        conn.close()


def id_checksum(ids: Iterator[str]) -> tuple[int, int]:
    """(count, sum of the first 64 bits of each hex id mod 2**64): order-independent."""
    count = total = 0
    for action_id in ids:
        count += 1
        total += int(action_id[:16], 16)
    return count, total % (1 << 64)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------- generate


def phase_generate(params: Params) -> Figures:
    """The seeded store: customers, then the pending actions, in committed batches."""
    from engine.decide import action_id
    from engine.store import open_store

    start = time.perf_counter()
    db = Path(params["db"])
    spec: dict[str, Any] = params["spec"]
    rng = random.Random(spec["seed"])
    remove_db(db)
    shape: dict[str, Any] = {
        "send": 0,
        "send_personalised": 0,
        "send_with_coupon": 0,
        "invite_group": 0,
        "tag": 0,
        "no_expiry": 0,
    }
    with open_store(db) as store:
        conn = store.conn
        conn.execute("PRAGMA synchronous = OFF")
        n_customers = int(spec["customers"])
        width = max(7, len(str(n_customers)))
        ids = [f"C{i:0{width}d}" for i in range(1, n_customers + 1)]
        names: list[str] = []
        step = time.perf_counter()
        for first in range(0, n_customers, BATCH):
            rows = []
            for customer_id in ids[first : first + BATCH]:
                name = rng.choice(SURNAMES) + rng.choice(GIVEN)
                names.append(name)
                rows.append(
                    (
                        customer_id,
                        name,
                        f"wm{rng.getrandbits(120):030x}",
                        rng.choice(STAFF),
                        f"1{rng.choice('3589')}{rng.randrange(10**9):09d}",
                        NOW - rng.randrange(1, 730 * DAY),
                        rng.choice(CHANNELS),
                        json.dumps({"openid": f"o{rng.getrandbits(108):027x}"}),
                    )
                )
            with store.transaction() as tx:
                tx.executemany(INSERT_CUSTOMER, rows)
        log(f"  customers: {n_customers:,} in {time.perf_counter() - step:.1f}s")

        step = time.perf_counter()
        hashes = {p: hashlib.sha256(p.encode()).hexdigest()[:16] for p in playbooks()}
        n_actions = int(spec["actions"])
        messages: set[str] = set()
        for first in range(0, n_actions, BATCH):
            batch = []
            for number in range(first, min(first + BATCH, n_actions)):
                index = rng.randrange(n_customers)
                row = action_row(rng, number, ids[index], names[index], hashes, shape, action_id)
                if row[12] is not None and len(messages) < 100_000:
                    messages.add(row[12])
                batch.append(row)
            with store.transaction() as tx:
                tx.executemany(INSERT_ACTION, batch)
            if (first // BATCH) % 10 == 9:
                log(f"  {first + len(batch):,} actions written")
        log(f"  actions: {n_actions:,} in {time.perf_counter() - step:.1f}s")
        shape["distinct_messages"] = len(messages) if len(messages) < 100_000 else ">=100000"
        shape["templates"] = len(SEND_TEXTS) * len(AMOUNTS) + len(INVITES)
        shape["staff"] = len(STAFF)
        with store.transaction() as tx:
            tx.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [
                    ("bench_export_shape", json.dumps(shape)),
                    ("bench_export_spec", json.dumps(spec)),
                ],
            )
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return {"seconds": time.perf_counter() - start, "shape": shape}


def playbooks() -> list[str]:
    found = {p for p, *_ in SEND_TEXTS} | {p for p, *_ in INVITES} | {p for p, *_ in TAG_ACTIONS}
    return sorted(found)


def action_row(
    rng: random.Random,
    number: int,
    customer_id: str,
    name: str,
    hashes: dict[str, str],
    shape: dict[str, Any],
    action_id: Callable[[str, str, str, str, int], str],
) -> tuple[Any, ...]:
    """One pending queue row, as a run decides it (see ACTION_COLUMNS)."""
    pick = rng.random()
    scheduled = NOW - rng.randrange(60, 2 * DAY)
    decided = scheduled - rng.randrange(0, 6 * 3600)
    expires = None if rng.random() < NO_EXPIRY_SHARE else scheduled + rng.choice((3, 7, 14)) * DAY
    shape["no_expiry"] += expires is None
    message = coupon = group = added = removed = attachments = template = None
    channel: str | None = "wecom"
    index = 0
    if pick < SEND_SHARE:
        kind = "send"
        playbook, rule, text, prefix = rng.choice(SEND_TEXTS)
        amount = rng.choice(AMOUNTS)
        template = f"{rule}-{amount}"
        message = text.format(amount=amount, name=name)
        shape["send"] += 1
        shape["send_personalised"] += "{name}" in text
        if prefix is not None and rng.random() < COUPON_GIVEN_PREFIX:
            coupon = f"{prefix}{amount}"
            link = {
                "title": f"{amount}元优惠券",
                "type": "link",
                "url": f"https://m.example-shop.cn/coupon/{coupon}",
            }
            attachments = json.dumps([link], ensure_ascii=False, sort_keys=True)
            shape["send_with_coupon"] += 1
    elif pick < SEND_SHARE + INVITE_SHARE:
        kind = "invite_group"
        playbook, rule, group, text = rng.choice(INVITES)
        template = f"{rule}-invite"
        message = text.format(name=name)
        title, url = GROUPS[group]
        attachments = json.dumps(
            [{"title": title, "type": "link", "url": url}], ensure_ascii=False, sort_keys=True
        )
        shape["invite_group"] += 1
    else:
        kind, channel, index = "tag", None, 1
        playbook, rule, added, removed = rng.choice(TAG_ACTIONS)
        scheduled = decided  # non-message actions are due when decided
        shape["tag"] += 1
    trigger = f"entry:{number}"
    return (
        action_id(playbook, rule, customer_id, trigger, index),
        f"run-{playbook}-{decided // DAY}",
        playbook,
        1,
        hashes[playbook],
        rule,
        customer_id,
        trigger,
        index,
        kind,
        channel,
        template,
        message,
        coupon,
        group,
        added,
        removed,
        decided,
        scheduled,
        expires,
        "pending",
        attachments,
    )


# --------------------------------------------------------------------------- baseline


def phase_baseline(params: Params) -> Figures:
    """The due rows with their customer fields, read in chunks, written as JSON lines."""
    from engine.store import open_store

    db, target = params["db"], Path(params["out"])
    with open_store(db):
        pass  # a reused store made by an older engine: bring its schema up to date first
    target.unlink(missing_ok=True)
    with open_store(db, readonly=True) as store:
        rss_before = peak_rss_mib()
        cpu = cpu_seconds()
        start = time.perf_counter()
        rows = 0
        cursor = store.conn.execute(BASELINE_SQL, {"now": NOW})
        names = [d[0] for d in cursor.description]
        dumps = json.dumps
        with target.open("wb") as handle:
            while chunk := cursor.fetchmany(READ_CHUNK):
                handle.write(
                    "".join(
                        dumps(dict(zip(names, row, strict=True)), ensure_ascii=False) + "\n"
                        for row in chunk
                    ).encode("utf-8")
                )
                rows += len(chunk)
            handle.flush()
            os.fsync(handle.fileno())
        seconds = time.perf_counter() - start
        cpu = cpu_seconds() - cpu
    return {
        "seconds": seconds,
        "rows": rows,
        "file_mib": round(target.stat().st_size / 2**20, 1),
        "cpu_s": round(cpu, 2),
        "rss_before_phase_mib": rss_before,
    }


# --------------------------------------------------------------------------- export


class Progress:
    """Counts the actions the exporter reads; logs RSS at every tenth of the expected."""

    def __init__(self, total: int) -> None:
        self.total = max(total, 1)
        self.count = 0
        self.tenth = 1
        self.next_at = self._at(1)
        self.samples: dict[str, float] = {}

    def _at(self, tenth: int) -> int:
        return -(-self.total * tenth // 10)

    def step(self) -> None:
        self.count += 1
        if self.count >= self.next_at:
            while self.tenth <= 10 and self.count >= self._at(self.tenth):
                rss = current_rss_mib()
                self.samples[f"{self.tenth * 10}%"] = rss
                log(
                    f"    {self.tenth * 10:3d}% of the actions read ({self.count:,}), RSS {rss} MiB"
                )
                self.tenth += 1
            self.next_at = self._at(self.tenth) if self.tenth <= 10 else 1 << 62


PART_ITEMS = "read the snapshot into Items"


def instrument(core: Any, http: Any, watch: Any, progress: Progress) -> None:
    """Time the exporter's steps by wrapping its functions (they overlap where nested:
    see the names); count the actions read."""
    core._recover_files = watch.wrap("recover interrupted batches", core._recover_files)
    core._expire = watch.wrap("expire", core._expire)
    core._snapshot = watch.wrap(
        "snapshot (due actions + customers, sorted, into a temp table)", core._snapshot
    )
    core._platform_limit = watch.wrap("WeCom monthly limit", core._platform_limit)
    core._waiting_tags = watch.wrap("count waiting tag actions", core._waiting_tags)
    core._write_files = watch.wrap("file", core._write_files)
    core._write_one = watch.wrap("file > build and write the lines", core._write_one)
    core._AtomicFile.finish = watch.wrap("file > flush and fsync", core._AtomicFile.finish)
    core._AtomicFile.rename = watch.wrap("file > rename", core._AtomicFile.rename)
    core._send = watch.wrap("http", core._send)
    core._Sender.claim = watch.wrap(
        "http > claim (serialise the body, store it, mark exporting)", core._Sender.claim
    )
    http.Poster.send = watch.wrap("http > POST (signing included)", http.Poster.send)
    core._Sender._record = watch.wrap("http > record (mark sent)", core._Sender._record)
    real_items = core._items

    def items(store: Any, chunk: int = 5_000) -> Iterator[Any]:
        source = real_items(store, chunk)
        clock = time.perf_counter
        spent = 0.0
        try:
            while True:
                began = clock()
                try:
                    item = next(source)
                except StopIteration:
                    spent += clock() - began
                    return
                spent += clock() - began
                progress.step()
                if progress.count % READ_CHUNK == 0:
                    with watch.lock:
                        watch.parts[PART_ITEMS] = watch.parts.get(PART_ITEMS, 0.0) + spent
                    spent = 0.0
                yield item
        finally:
            with watch.lock:
                watch.parts[PART_ITEMS] = watch.parts.get(PART_ITEMS, 0.0) + spent

    core._items = items


def derived_parts(parts: dict[str, float], total: float | None) -> dict[str, float]:
    """The measured parts, plus what the nested ones leave of their parent (and of the
    whole export, unless it was stopped: a part still running is in no figure)."""
    out = dict(parts)
    items = parts.get(PART_ITEMS, 0.0)
    if "file" in parts:
        inner = sum(v for k, v in parts.items() if k.startswith("file > "))
        out["file > queue updates (exporting, exported; batch rows)"] = parts["file"] - inner
        out["file > build and write the lines > excluding reading Items"] = (
            parts.get("file > build and write the lines", 0.0) - items
        )
    if "http" in parts:
        inner = sum(v for k, v in parts.items() if k.startswith("http > "))
        out["http > build the rows (flat_row) and batches"] = parts["http"] - inner - items
    if total is not None:
        top = [k for k in parts if " > " not in k and k != PART_ITEMS]
        out["other (lock, drop temp table, ...)"] = total - sum(parts[k] for k in top)
    return {k: round(v, 3) for k, v in out.items()}


def phase_export(params: Params) -> Figures:
    """One export on a fresh copy of the store, timed, then checked."""
    from engine.export import core, http
    from engine.export.model import ExportConfig, WebhookConfig, WecomConfig
    from engine.settings import Settings
    from engine.store import open_store

    to = params["to"]
    settings = Settings(
        export=ExportConfig(
            wecom=WecomConfig(tag_ids=dict(TAG_IDS), monthly_limit=MONTHLY_LIMIT),
            webhook=WebhookConfig(batch_size=int(params["batch_size"])),
        )
    )
    env = {"PLAYBOOK_WEBHOOK_SECRET": os.environ[SECRET_ENV]}
    if "url" in params:  # never through a proxy that the environment may name
        for name in ("NO_PROXY", "no_proxy"):
            os.environ[name] = ",".join(filter(None, ("127.0.0.1,localhost", os.environ.get(name))))
    watch = run_bench.Stopwatch()
    figures = watch.figures
    figures.update(to=to, batches=0, moved=0, failed=0, suppressed=0, expired=0)
    progress = Progress(int(params["expected"]))
    instrument(core, http, watch, progress)
    with open_store(params["db"]) as store:
        figures["rss_before_export_mib"] = peak_rss_mib()
        cpu = cpu_seconds()
        start = time.perf_counter()

        def finish(partial: Figures) -> None:
            seconds = time.perf_counter() - start
            partial.update(
                seconds=seconds,
                actions_read=progress.count,
                rss_by_progress=dict(progress.samples),
                cpu_s=round(cpu_seconds() - cpu, 2),
            )
            partial["parts_s"] = derived_parts(partial["parts_s"], None)

        stop = run_bench.start_watchdog(watch, float(params["time_limit"]), finish)
        result = core.export(
            store,
            settings,
            to,
            out=params.get("out"),
            url=params.get("url"),
            now=NOW,
            env=env,
        )
        seconds = time.perf_counter() - start
        stop.set()
        # The exporter's own figures, before the checks below read anything.
        figures.update(peak_rss_mib=peak_rss_mib(), vm_hwm_mib=vm_hwm_mib(), io=io_mib())
        with watch.lock:
            parts = dict(watch.parts)
        figures.update(
            seconds=seconds,
            cpu_s=round(cpu_seconds() - cpu, 2),
            moved=result.exported + result.sent,
            exported=result.exported,
            sent=result.sent,
            failed=result.failed,
            suppressed=result.suppressed,
            expired=result.expired,
            batches=result.batches,
            stopped=result.stopped,
            failure_reasons=dict(result.reasons),
            notes=result.notes,
            recovered=result.recovered,
            actions_read=progress.count,
            rss_by_progress=progress.samples,
            parts_s=derived_parts(parts, seconds),
        )
        log(f"  export done in {seconds:.2f}s; checking the queue and the output ...")
        figures.update(check_export(store, params, figures))
    return figures


def check_export(store: Any, params: Params, figures: Figures) -> Figures:
    conn = store.conn
    expected = int(params["expected"])
    statuses = dict(conn.execute("SELECT status, count(*) FROM actions GROUP BY status"))
    final = "exported" if params["to"] == "wecom" else "sent"
    db_count, db_sum = id_checksum(
        row[0] for row in conn.execute("SELECT action_id FROM actions WHERE status = ?", (final,))
    )
    checks = {
        f"every due action {final}": statuses.get(final, 0) == expected == figures["moved"],
        "none left pending or in flight": not any(
            statuses.get(s) for s in ("pending", "exporting")
        ),
    }
    found: Figures = {"statuses_after": statuses, "checksum_db": db_sum}
    if params["to"] == "wecom":
        out = Path(params["out"])
        lines = ids = max_recipients = 0
        total = 0
        endpoints: dict[str, int] = {}
        with out.open("rb") as handle:
            for line in handle:
                record = json.loads(line)
                lines += 1
                endpoint = record["endpoint"]
                endpoints[endpoint] = endpoints.get(endpoint, 0) + 1
                count, checksum = id_checksum(iter(record["action_ids"]))
                ids += count
                total += checksum
                if "external_userid" in record["body"] and isinstance(
                    record["body"]["external_userid"], list
                ):
                    max_recipients = max(max_recipients, len(record["body"]["external_userid"]))
        found.update(
            file_mib=round(out.stat().st_size / 2**20, 1),
            file_lines=lines,
            file_requests_by_endpoint=endpoints,
            file_max_recipients_per_task=max_recipients,
        )
        checks["the file carries exactly the exported actions"] = (ids, total % (1 << 64)) == (
            db_count,
            db_sum,
        )
    else:
        batches = dict(conn.execute("SELECT status, count(*) FROM export_batches GROUP BY status"))
        bodies = conn.execute(
            "SELECT count(*), coalesce(sum(length(body)), 0) FROM export_batches "
            "WHERE body IS NOT NULL"
        ).fetchone()
        found.update(batches_by_status=batches, bodies_kept=bodies[0], bodies_kept_bytes=bodies[1])
        checks["every batch sent, its body dropped"] = (
            batches == {"sent": figures["batches"]} and bodies[0] == 0
        )
    found["checks"] = checks
    return found


# --------------------------------------------------------------------------- receiver


def phase_receiver(params: Params) -> Figures:
    """A local webhook receiver: 200 to every POST at once; counts, and checks a sample.

    Serves until its stdin is closed, then returns what it received.
    """
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    secret = os.environ[SECRET_ENV]
    key = base64.b64decode(secret.removeprefix("whsec_"))
    lock = threading.Lock()
    stats: Figures = {
        "requests": 0,
        "bytes": 0,
        "actions": 0,
        "checksum": 0,
        "duplicate_ids": 0,
        "signatures_checked": 0,
        "signature_failures": 0,
        "sample_mismatches": 0,
        "max_timestamp_skew_s": 0,
        "handler_s": 0.0,
        "first_request_at": None,
        "last_request_at": None,
    }
    seen: set[str] = set()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects

        def do_POST(self) -> None:
            began = time.perf_counter()
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            ids = ACTION_ID_IN_BODY.findall(body)
            checksum = sum(int(i[:16], 16) for i in ids)
            msg_id = self.headers.get("webhook-id", "")
            with lock:
                stats["requests"] += 1
                number = stats["requests"]
                stats["bytes"] += len(body)
                stats["actions"] += len(ids)
                stats["checksum"] = (stats["checksum"] + checksum) % (1 << 64)
                stats["duplicate_ids"] += msg_id in seen
                seen.add(msg_id)
                stats["first_request_at"] = stats["first_request_at"] or began
            if number % SAMPLE_EVERY == 1 or SAMPLE_EVERY == 1:
                self.check(body, msg_id, len(ids))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            with lock:
                stats["last_request_at"] = time.perf_counter()
                stats["handler_s"] += stats["last_request_at"] - began

        def check(self, body: bytes, msg_id: str, counted: int) -> None:
            """Standard Webhooks, verified independently of the engine's code."""
            timestamp = self.headers.get("webhook-timestamp", "")
            signed = f"{msg_id}.{timestamp}.".encode() + body
            expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
            given = [
                s.partition(",")[2]
                for s in self.headers.get("webhook-signature", "").split()
                if s.startswith("v1,")
            ]
            good = any(hmac.compare_digest(expected, g) for g in given)
            try:
                skew = abs(time.time() - int(timestamp))
                payload = json.loads(body)
                same = (
                    payload.get("batch_id") == msg_id
                    and len(payload.get("actions", ())) == counted
                    and self.headers.get("idempotency-key") == msg_id
                )
            except ValueError:
                skew, same = float("inf"), False
            with lock:
                stats["signatures_checked"] += 1
                stats["signature_failures"] += not good or skew > 300
                stats["sample_mismatches"] += not same
                stats["max_timestamp_skew_s"] = max(stats["max_timestamp_skew_s"], skew)

        def do_GET(self) -> None:
            self.send_error(405)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    port_file = Path(params["port_file"])
    partial = port_file.with_name(port_file.name + ".partial")
    partial.write_text(str(server.server_address[1]), encoding="ascii")
    partial.replace(port_file)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    sys.stdin.read()  # until the parent closes it
    server.shutdown()
    server.server_close()
    with lock:
        first, last = stats.pop("first_request_at"), stats.pop("last_request_at")
        stats["span_s"] = round(last - first, 3) if first and last else 0.0
        stats["handler_s"] = round(stats["handler_s"], 3)
        stats["max_timestamp_skew_s"] = round(stats["max_timestamp_skew_s"], 1)
        stats["distinct_ids"] = len(seen)
        stats["cpu_s"] = round(cpu_seconds(), 2)
        # Started straight from the parent (not via /bin/sh), its ru_maxrss may be the
        # parent's peak: VmHWM is its own.
        stats["peak_rss_mib"] = vm_hwm_mib()
        stats["ru_maxrss_mib"] = peak_rss_mib()
        return dict(stats)


if __name__ == "__main__":
    main()
