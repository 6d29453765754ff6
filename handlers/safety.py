"""Consent, abuse and limits: the Report button, /privacy, /quota, /admin, bans and the result labels.

- Every result gets a Report button (``report:<artifact id>``, anyone who sees it may press it): the
  report is stored and each admin (``[access] admins``) gets the picture with its owner's user key and
  a button that bans the owner.
- ``/admin ban USER [reason]`` bans at once: the user's jobs are cancelled and everything they send is
  refused with the reason (a router user gate), except /privacy and /delete, which stay theirs.
  ``/admin unban USER``, ``/admin bans``, ``/admin stats`` (users, jobs per state, queue, safe mode).
- Quotas: jobs per user per UTC day and job kind (``[quotas]``), checked before every job a command
  starts (an admission check of ``handlers.hooks``); admins are exempt; /quota shows what is left.
- /privacy lists what is stored about the user and when each part expires (``[retention]``).
- Captions of results say they are AI-generated (and how many pictures safe mode held back), and
  every result gets its Report buttons: decorations registered in ``handlers.hooks``.

Times here are wall-clock Unix seconds from ``services.wall_clock`` when set (tests), else ``time.time``.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from facechain_core.errors import UserFacingError
from facechain_core.numbers import ascii_int
from facechain_core.safety import DEFAULT_SERVICE
from facechain_core.safety import FEATURE as SAFETY_FEATURE
from handlers import buttons, hooks, registry, router
from handlers.basic import other_files
from handlers.consent import consent_text
from handlers.messages import t
from handlers.progress import format_duration, kind_label
from handlers.protocols import Button, Event, Media, ReplyChannel, User
from handlers.services import Services

log = logging.getLogger(__name__)

DAY_S = 86_400.0
REPORT_ACTION = "report"  # report:<artifact id>
BAN_ACTION = "rban"  # rban:<report id>, admins only
REPORT_BUTTONS_PER_ROW = 3
# What a banned user may still do: see and erase their data.
BAN_EXEMPT_COMMANDS = frozenset({"privacy", "delete"})
BAN_EXEMPT_BUTTONS = frozenset({"delete", "keep"})
REASON_MAX_CHARS = 200


# -- time -----------------------------------------------------------------------------------------
def now_of(services: Services) -> float:
    """The wall clock (Unix seconds): ``services.wall_clock`` when a test set one."""
    clock = getattr(services, "wall_clock", None)
    return float(clock()) if callable(clock) else time.time()


def day_start(now: float) -> float:
    """The start of the UTC day holding `now` (Unix time counts no leap seconds)."""
    return now - now % DAY_S


def _date(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


# -- consent and labels ---------------------------------------------------------------------------
def service_name(services: Services) -> str:
    """The service named in the AI label (``[pipeline] label_service``)."""
    pipeline = getattr(services.settings, "pipeline", None) or {}
    return str(pipeline.get("label_service") or DEFAULT_SERVICE)


def result_caption(services: Services, job: Any, caption: str | None, lang: str) -> str:
    """`caption` with the AI-generated note (and how many pictures safe mode held back)."""
    meta = (getattr(job, "result", None) or {}).get("meta") or {}
    dropped = int((meta.get("safety") or {}).get("dropped") or 0)
    parts = [caption] if caption else []
    if dropped:
        parts.append(t("safety.dropped", lang, count=dropped))
    parts.append(t("safety.ai_note", lang, service=service_name(services)))
    return "\n".join(parts)


def with_report_buttons(keyboard: list[list[Button]] | None, artifacts: list[Any],
                        lang: str) -> list[list[Button]] | None:
    """`keyboard` with a Report button per artifact (numbered when there are several)."""
    numbered = len(artifacts) > 1
    row = [Button(t("safety.report_button", lang) + (f" {n}" if numbered else ""),
                  buttons.payload(REPORT_ACTION, a.id)) for n, a in enumerate(artifacts, start=1)]
    step = REPORT_BUTTONS_PER_ROW
    rows = list(keyboard or []) + [row[i:i + step] for i in range(0, len(row), step)]
    return rows or None


def add_report_buttons(services: Services, job: Any, keyboard: list[list[Button]] | None, artifacts: list[Any],
                       lang: str) -> list[list[Button]] | None:
    """A result keyboard decoration: the Report buttons (see ``with_report_buttons``)."""
    return with_report_buttons(keyboard, artifacts, lang)


def safety_status(services: Services) -> tuple[bool, bool]:
    """(safe mode on globally, safety checker installed)."""
    pipeline = getattr(services.settings, "pipeline", None) or {}
    return bool(pipeline.get("safe_mode", True)), SAFETY_FEATURE in services.features_installed


# -- quotas ---------------------------------------------------------------------------------------
def quota_of(services: Services, kind: str) -> int:
    """The daily limit of `kind` per user (0: none)."""
    return int((getattr(services.settings, "quotas", None) or {}).get(kind, 0))


def _reset_words(now: float, lang: str) -> dict[str, str]:
    reset = day_start(now) + DAY_S
    return {"reset": time.strftime("%H:%M UTC", time.gmtime(reset)), "wait": format_duration(reset - now, lang)}


async def check_quota(services: Services, event: Event, kind: str) -> None:
    """Refuses a job of `kind` past the user's daily quota, saying when it resets (admins are exempt)."""
    limit = quota_of(services, kind)
    if limit <= 0 or router.is_admin(services, event.user.key):
        return
    storage: Any = services.storage
    now = now_of(services)
    used = (await storage.jobs_per_kind(event.user.key, day_start(now))).get(kind, 0)
    if used >= limit:
        log.info("%s reached the daily quota of %s (%d)", event.user.key, kind, limit)
        raise UserFacingError("quota.exceeded", kind=kind_label(kind, event.language), limit=limit,
                              **_reset_words(now, event.language))


async def admit_within_quota(services: Services, event: Event, kind: str, params: dict[str, Any]) -> None:
    """An admission check: ``check_quota`` before every job (it only reads, so there is nothing to give back).

    ``progress.submit_with_progress`` holds the user's lock from the checks until the job row is written,
    so the count read here and the row that adds to it are one step."""
    await check_quota(services, event, kind)


async def show_quota(services: Services, event: Event, channel: ReplyChannel) -> None:
    """Shows the user's jobs today per kind against its quota, and when the quotas reset."""
    lang = event.language
    if router.is_admin(services, event.user.key):
        await channel.send_text(t("quota.admin", lang))
        return
    storage: Any = services.storage
    now = now_of(services)
    used = await storage.jobs_per_kind(event.user.key, day_start(now))
    limits = {k: v for k, v in (getattr(services.settings, "quotas", None) or {}).items() if v > 0}
    lines = [t("quota.header", lang, **_reset_words(now, lang))]
    for kind in sorted(set(limits) | set(used)):
        label = kind_label(kind, lang)
        if kind in limits:
            left = max(limits[kind] - used.get(kind, 0), 0)
            lines.append(t("quota.line", lang, kind=label, used=used.get(kind, 0), limit=limits[kind], left=left))
        else:
            lines.append(t("quota.line_unlimited", lang, kind=label, used=used[kind]))
    await channel.send_text("\n".join(lines))


# -- /privacy -------------------------------------------------------------------------------------
def _expiry(made: float | None, days: float, now: float, lang: str) -> str:
    if days <= 0 or made is None:
        return t("privacy.kept", lang)
    due = made + days * DAY_S
    return t("privacy.due", lang) if due <= now else t("privacy.expires", lang, date=_date(due))


async def show_privacy(services: Services, event: Event, channel: ReplyChannel) -> None:
    """Shows what is stored about the user and when each part expires."""
    lang, key = event.language, event.user.key
    storage: Any = services.storage
    summary = await storage.stored_summary(key)
    days = services.settings.retention.days()
    now = now_of(services)
    lines = [t("privacy.header", lang)]
    for data_class in ("selfies", "identities", "loras", "results"):
        entry = summary[data_class]
        if entry["count"]:
            lines.append(t(f"privacy.{data_class}", lang, count=entry["count"], made=_date(entry["oldest"]),
                           expiry=_expiry(entry["oldest"], days[data_class], now, lang)))
    others = await other_files(services, key, now)
    if others:
        lines.append(t("privacy.files", lang, count=len(others), made=_date(others[0].written),
                       hours=round(services.settings.retention.inputs_hours)))
    if summary["jobs"]:
        lines.append(t("privacy.jobs", lang, count=summary["jobs"]))
    if summary["reports_made"]:
        lines.append(t("privacy.reports", lang, count=summary["reports_made"]))
    if summary.get("duo_results"):
        lines.append(t("privacy.duo_results", lang, count=summary["duo_results"]))
    if len(lines) == 1:
        lines.append(t("privacy.nothing", lang))
    if await storage.ban(key) is not None:
        lines.append(t("privacy.banned", lang))
    lines += ["", t("privacy.duo_explained", lang), "", consent_text(services, lang)]
    await channel.send_text("\n".join(lines))


# -- reports --------------------------------------------------------------------------------------
async def press_report(services: Services, event: Event, channel: ReplyChannel, artifact_id: str) -> None:
    """Records a report of a result (anyone who sees it may report it) and tells the admins once."""
    lang = event.language
    storage: Any = services.storage
    artifact = await storage.artifact(artifact_id)
    if artifact is None:
        await channel.answer_button(t("button.stale", lang))
        return
    report, new = await storage.add_report(artifact.id, artifact.owner_key, event.user.key, event.chat.key)
    if not new:
        await channel.answer_button(t("safety.already_reported", lang))
        return
    log.info("report %d: artifact %s of %s reported by %s in %s", report.id, artifact.id, artifact.owner_key,
             event.user.key, event.chat.key)
    if report.reporters == 1:
        await notify_admins(services, report, artifact, event.user.key)
    await channel.answer_button(t("safety.reported", lang), alert=True)


async def notify_admins(services: Services, report: Any, artifact: Any, reporter_key: str) -> int:
    """Sends each admin, in their private chat, the reported picture with its owner's key; returns how many got it."""
    storage: Any = services.storage
    path = Path(artifact.path)
    told = 0
    for admin in services.settings.access.admins:
        platform, _, user_id = admin.partition(":")
        lang = await storage.user_language(admin) or services.default_language
        caption = t("safety.report_admin", lang, id=report.id, owner=artifact.owner_key, reporter=reporter_key,
                    chat=report.chat_key, artifact=artifact.id)
        keyboard = [[Button(t("safety.ban_button", lang), buttons.payload(BAN_ACTION, report.id))]]
        try:
            channel = services.channel_for(await services.private_chat(User(platform, user_id)))
            if artifact.media_type.startswith("image/") and path.is_file():
                await channel.send_images([Media(path=path)], caption=caption, buttons=keyboard)
            else:
                await channel.send_text(caption, keyboard)
        except Exception:
            log.warning("could not tell admin %s about report %d", admin, report.id, exc_info=True)
            continue
        told += 1
    if not told:
        log.warning("report %d reached no admin (set [access] admins, and each admin must have started the bot)",
                    report.id)
    return told


async def press_ban_owner(services: Services, event: Event, channel: ReplyChannel, argument: str) -> None:
    """Bans the owner of a reported result (admins only)."""
    lang = event.language
    if not router.is_admin(services, event.user.key):
        await channel.answer_button(t("core.admin_only", lang), alert=True)
        return
    storage: Any = services.storage
    report_id = ascii_int(argument)
    report = await storage.report(report_id) if report_id is not None else None
    if report is None:
        await channel.answer_button(t("button.stale", lang))
        return
    text = await _ban_and_say(services, event, report.owner_key, t("safety.report_reason", lang, id=report.id))
    await channel.answer_button(text[:router.ALERT_MAX_CHARS], alert=True)


# -- bans -----------------------------------------------------------------------------------------
async def refuse_banned(services: Services, event: Event) -> str | None:
    """A router user gate: the refusal (with the reason) for a banned user, None for everyone else."""
    if router.is_admin(services, event.user.key):
        return None
    if event.command and event.command.lower() in BAN_EXEMPT_COMMANDS:
        return None
    if event.button_payload and event.button_payload.partition(":")[0] in BAN_EXEMPT_BUTTONS:
        return None
    storage: Any = services.storage
    ban = await storage.ban(event.user.key)
    if ban is None:
        return None
    reason = t("safety.banned_reason", event.language, reason=ban.reason) if ban.reason else ""
    return t("safety.banned", event.language, reason=reason)


async def ban_user(services: Services, user_key: str, reason: str, by: str) -> tuple[bool, list[int]]:
    """Bans `user_key` and cancels their queued and running jobs; returns (newly banned, job ids cancelled)."""
    storage: Any = services.storage
    new = await storage.ban_user(user_key, reason[:REASON_MAX_CHARS], by)
    cancelled = await services.jobs.cancel(user_key)
    log.info("%s banned %s (%s); jobs cancelled: %s", by, user_key, reason or "no reason", cancelled or "none")
    return new, cancelled


async def _ban_and_say(services: Services, event: Event, user_key: str, reason: str) -> str:
    lang = event.language
    if router.is_admin(services, user_key):
        return t("admin.cannot_ban_admin", lang, user=user_key)
    new, cancelled = await ban_user(services, user_key, reason, event.user.key)
    code = "admin.banned" if new else "admin.already_banned"
    return t(code, lang, user=user_key, jobs=len(cancelled))


# -- /admin ---------------------------------------------------------------------------------------
def parse_user(argument: str, event: Event) -> str:
    """A user key from ``platform:id``, or a bare id on the admin's own platform."""
    platform, sep, user_id = argument.partition(":")
    if not sep:
        platform, user_id = event.user.platform, argument
    if not platform.isascii() or not platform.isalpha() or ascii_int(user_id) is None:
        raise UserFacingError("admin.bad_user", user=argument[:64])
    return f"{platform.lower()}:{user_id}"


async def admin_command(services: Services, event: Event, channel: ReplyChannel) -> None:
    """Runs an operator action: ban, unban, bans, stats."""
    lang = event.language
    action = event.args[0].lower() if event.args else ""
    storage: Any = services.storage
    if action in ("ban", "unban") and len(event.args) >= 2:
        user_key = parse_user(event.args[1], event)
        if action == "ban":
            text = await _ban_and_say(services, event, user_key, " ".join(event.args[2:]).strip())
        else:
            lifted = await storage.unban_user(user_key)
            log.info("%s unbanned %s (%s)", event.user.key, user_key, "lifted" if lifted else "was not banned")
            text = t("admin.unbanned" if lifted else "admin.not_banned", lang, user=user_key)
        await channel.send_text(text)
    elif action == "bans":
        bans = await storage.bans()
        lines = [t("admin.bans_header", lang, count=len(bans))] if bans else [t("admin.no_bans", lang)]
        lines += [t("admin.ban_line", lang, user=b.user_key, date=_date(b.created_at), by=b.banned_by,
                    reason=b.reason or "-") for b in bans]
        await channel.send_text("\n".join(lines))
    elif action == "stats":
        await channel.send_text(await stats_text(services, lang))
    else:
        await channel.send_text(t("admin.usage", lang))


async def stats_text(services: Services, lang: str) -> str:
    """Users, jobs per state, the queue and safe mode, for /admin stats."""
    storage: Any = services.storage
    stats = await storage.stats()
    jobs = ", ".join(f"{state} {n}" for state, n in sorted(stats["jobs"].items())) or "0"
    health = getattr(services.jobs, "health", None)
    queue = health() if callable(health) else {}
    on, installed = safety_status(services)
    safe = t("admin.safe_off", lang) if not on else t("admin.safe_on" if installed else "admin.safe_unchecked", lang)
    return "\n".join([
        t("admin.stats_users", lang, users=stats["users"], bans=stats["bans"], reports=stats["reports"]),
        t("admin.stats_jobs", lang, jobs=jobs),
        t("admin.stats_queue", lang, queued=queue.get("queued", "?"), running=queue.get("running", "?"),
          alive=queue.get("workers_alive", "?"), workers=queue.get("workers", "?")),
        safe,
    ])


registry.register_command("privacy", show_privacy, "help.privacy")
registry.register_command("quota", show_quota, "help.quota")
registry.register_command("admin", admin_command, "help.admin", admin_only=True)
registry.register_user_gate(refuse_banned)
hooks.register_admission_check(admit_within_quota, hooks.AdmissionStage.USER)
hooks.register_caption_decorator(result_caption)
hooks.register_keyboard_decorator(add_report_buttons)
buttons.register_core_button(REPORT_ACTION, press_report)
buttons.register_core_button(BAN_ACTION, press_ban_owner)
