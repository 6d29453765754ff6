"""Duo and group portraits of people who all said yes: /duo STYLE, /group STYLE, /duo block.

In a group, ``/duo STYLE`` replying to a member's message (or naming them with a tap, Telegram's
text_mention; Discord's ``partner`` option) asks that member; ``/group STYLE`` names up to three. Partners
are only ever chosen in a chat both share. Each partner must have a face profile already (otherwise the
requester is told and the partner is invited privately) and must not have blocked the requester. Every
partner then gets a request that only they can answer, in the group and privately where the platform lets
the bot write first: who asks, the style, and what will happen. Only when all said yes is the "duo" job
submitted, as the requester's (their quota, the group's rules and safe mode); a "No", or no answer within
``[duo] consent_timeout_s``, makes nothing and the requester is told. ``/duo block`` (replying to or naming
someone) stops their requests to you; ``/duo unblock`` lets them ask again. The result belongs to everyone
in it (``artifact_owners``): each can share or delete it, and anyone's /delete removes it for all.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from pathlib import Path
from typing import Any

from facechain_core.errors import UserFacingError
from facechain_core.templates import TemplateEntry, TemplateLibrary
from handlers import buttons, chat_settings, portrait, registry, template
from handlers.messages import t
from handlers.progress import present_default, register_presenter, submit_with_progress
from handlers.protocols import Button, Chat, Event, ReplyChannel, User
from handlers.services import Services

log = logging.getLogger(__name__)

KIND = "duo"
TEMPLATE_KIND = "duo_template"  # a multi-face template of the library, filled face by face
FEATURE = "portrait"
DUO_FEATURE = "duo"  # the openpose ControlNet that holds the layout (manifest feature)
YES, NO = "duoyes", "duono"
MAX_PARTNERS = {"duo": 1, "group": 3}
BLOCK_WORDS = {"block": True, "unblock": False, "屏蔽": True, "取消屏蔽": False}
COUNT = 2


# -- commands -----------------------------------------------------------------------------------
async def ask_duo(services: Services, event: Event, channel: ReplyChannel) -> None:
    """Asks one member's consent to a portrait of the two of you (or blocks / unblocks a requester)."""
    if event.args and event.args[0].lower() in BLOCK_WORDS:
        await set_block(services, event, channel, BLOCK_WORDS[event.args[0].lower()])
        return
    await ask_partners(services, event, channel, "duo")


async def ask_group(services: Services, event: Event, channel: ReplyChannel) -> None:
    """Asks up to three members' consent to a portrait of all of you."""
    await ask_partners(services, event, channel, "group")


async def ask_partners(services: Services, event: Event, channel: ReplyChannel, command: str) -> None:
    """Checks the request, then sends each partner a consent request only they can answer."""
    lang = event.language
    if event.chat.is_private:
        raise UserFacingError("duo.group_only", command=command)
    if not (await chat_settings.load_settings(services, event.chat)).allows("duo"):
        raise UserFacingError(chat_settings.command_off_code(command), command=command)
    if not event.args:
        raise UserFacingError("duo.usage", command=command)
    partners = partners_of(event)
    if not partners or len(partners) > MAX_PARTNERS[command]:
        raise UserFacingError("duo.who", command=command, most=MAX_PARTNERS[command])
    look = group_look(services, " ".join(event.args), len(partners) + 1, lang)
    storage: Any = services.storage
    requester = event.user
    if await storage.identity(requester.key) is None:
        raise UserFacingError("duo.need_selfie")
    for partner in partners:
        if await storage.duo_blocked(partner.key, requester.key):
            log.info("duo request of %s to %s refused: blocked", requester.key, partner.key)
            raise UserFacingError("duo.blocked", name=partner.name or "?")
        if await storage.duo_waiting_between(requester.key, partner.key):  # one open question per person
            raise UserFacingError("duo.already_asked", name=partner.name or "?")
    missing = [p for p in partners if await storage.identity(p.key) is None]
    if missing:
        for partner in missing:
            await _invite(services, partner, requester)
        raise UserFacingError("duo.partner_no_identity", names=", ".join(p.name or "?" for p in missing))
    await open_request(services, event, channel, look, partners)


def group_look(services: Services, name: str, people: int, lang: str) -> Any:
    """A library template showing exactly `people` faces named `name`, else an SD1.5 style (or a refusal)."""
    entry = template.library().with_faces(people).find(name)
    if entry is not None:
        services.require_feature(template.FEATURE)
        overrides = {k: str(v) for k, v in (getattr(services.settings, "model_paths", {}) or {}).items()}
        if TemplateLibrary.picture(entry, Path(services.settings.models_dir), overrides) is None:
            raise UserFacingError("template.not_installed", name=entry.display_name(lang))
        return entry
    if FEATURE not in services.features_installed or DUO_FEATURE not in services.features_installed:
        raise UserFacingError("feature.not_installed", feature=KIND)
    return portrait._catalogue(services).only(["sd15"]).find(name, lang)


def partners_of(event: Event) -> list[User]:
    """The people named by a tap or an option, else the sender of the message replied to; never the
    requester, never a bot."""
    found = list(event.mentions)
    if not found and event.reply_to is not None and event.reply_to.sender_user is not None:
        found = [event.reply_to.sender_user]
    unique: dict[str, User] = {}
    for person in found:
        if person.key != event.user.key and person.platform == event.user.platform:
            unique.setdefault(person.key, person)
    return list(unique.values())


async def open_request(services: Services, event: Event, channel: ReplyChannel, style: Any,
                       partners: list[User]) -> None:
    """Stores the request, sends each partner their Yes / No, and starts the answer's clock."""
    storage: Any = services.storage
    request_id = secrets.token_urlsafe(9)
    ttl = float(services.settings.duo.consent_timeout_s)
    is_template = isinstance(style, TemplateEntry)
    params = {"style_id": None if is_template else style.id, "template_id": style.id if is_template else None,
              "requester_name": event.user.name, "language": event.language,
              "partners": [{"key": p.key, "name": p.name, "language": p.language} for p in partners]}
    await storage.open_duo_request(request_id, event.user.key, event.chat.to_dict(), params,
                                   [p.key for p in partners], ttl)
    log.info("duo request %s of %s to %s in %s", request_id, event.user.key, [p.key for p in partners],
             event.chat.key)
    minutes = max(1, round(ttl / 60))
    for partner in partners:
        text = t("duo.request", event.language, partner=partner.name or "?", requester=event.user.name or "?",
                 style=style.display_name(event.language), people=len(partners) + 1, minutes=minutes)
        await channel.send_text(text, _answer_buttons(request_id, event.language))
        await _tell_privately(services, partner, "duo.request_private", _answer_buttons(
            request_id, partner.language or event.language), requester=event.user.name or "?",
            style=style.display_name(partner.language or event.language), people=len(partners) + 1,
            chat=event.chat.title or "?", minutes=minutes)
    await channel.send_text(t("duo.asked", event.language, names=", ".join(p.name or "?" for p in partners)))
    _start_timer(services, request_id, ttl)


def _answer_buttons(request_id: str, lang: str) -> list[list[Button]]:
    return [[Button(t("duo.yes", lang), buttons.payload(YES, request_id)),
             Button(t("duo.no", lang), buttons.payload(NO, request_id))]]


# -- answers ------------------------------------------------------------------------------------
async def press_yes(services: Services, event: Event, channel: ReplyChannel, request_id: str) -> None:
    """Records a partner's yes; the last yes submits the job as the requester's."""
    request = await _own_request(services, event, channel, request_id)
    if request is None:
        return
    storage: Any = services.storage
    if not await storage.answer_duo(request_id, event.user.key, "yes"):
        await channel.answer_button(t("duo.over", event.language), alert=True)
        return
    await channel.answer_button(t("duo.thanks_yes", event.language))
    request = await storage.duo_request(request_id)
    if request is None or any(answer != "yes" for answer in request.answers.values()):
        return
    if await storage.close_duo_request(request_id, "accepted"):
        await start_job(services, request)


async def press_no(services: Services, event: Event, channel: ReplyChannel, request_id: str) -> None:
    """Records a partner's no: nothing is made, and the requester is told politely."""
    request = await _own_request(services, event, channel, request_id)
    if request is None:
        return
    storage: Any = services.storage
    if not await storage.answer_duo(request_id, event.user.key, "no") or \
            not await storage.close_duo_request(request_id, "declined"):
        await channel.answer_button(t("duo.over", event.language), alert=True)
        return
    await channel.answer_button(t("duo.thanks_no", event.language))
    log.info("duo request %s declined by %s", request_id, event.user.key)
    await _tell_requester(services, request, "duo.declined", name=event.user.name or "?")


async def _own_request(services: Services, event: Event, channel: ReplyChannel, request_id: str) -> Any | None:
    """The request when the presser is one of its partners; otherwise answers the press and returns None."""
    storage: Any = services.storage
    request = await storage.duo_request(request_id)
    if request is None:
        await channel.answer_button(t("button.stale", event.language))
        return None
    if event.user.key not in request.answers:
        log.info("%s pressed a duo answer meant for %s", event.user.key, list(request.answers))
        await channel.answer_button(t("duo.not_for_you", event.language), alert=True)
        return None
    return request


async def start_job(services: Services, request: Any) -> None:
    """Submits the duo job as the requester's (their quota, the group's rules) over everyone's identity."""
    storage: Any = services.storage
    params = request.params
    lang = params.get("language") or "en"
    owners = [request.requester_key] + list(request.answers)
    identities = []
    for key in owners:
        identity = await storage.identity(key)
        if identity is None:  # deleted meanwhile
            await _tell_requester(services, request, "duo.no_identity")
            return
        identities.append(identity.path)
    job = {"count": COUNT, "identities": identities, "owners": owners,
           "names": [params.get("requester_name", "")] + [p.get("name", "") for p in params.get("partners", [])]}
    kind = KIND
    if params.get("template_id"):
        entry = template.library().get(params["template_id"])
        overrides = {k: str(v) for k, v in (getattr(services.settings, "model_paths", {}) or {}).items()}
        picture = TemplateLibrary.picture(entry, Path(services.settings.models_dir), overrides) if entry else None
        if entry is None or picture is None:
            await _tell_requester(services, request, "duo.over")
            return
        kind = TEMPLATE_KIND
        job.update({"template": str(picture.resolve()), "template_id": entry.id})
    else:
        style = services.styles.get(params["style_id"]) if services.styles else None
        if style is None:
            await _tell_requester(services, request, "duo.over")
            return
        job.update({"style": style.model_dump(mode="json"), "style_id": style.id})
    platform, _, user_id = request.requester_key.partition(":")
    chat = Chat.from_dict(request.chat)
    requester = User(platform=platform, id=user_id, name=params.get("requester_name", ""), language=lang)
    event = Event(user=requester, chat=chat, language=lang, update_key=f"duo:{request.id}")
    channel = services.channel_for(chat)
    try:
        await submit_with_progress(services, event, channel, kind, job)
    except UserFacingError as exc:  # the requester's quota, the group's rules
        await channel.send_text(t(exc.code, lang, **exc.details))


# -- blocking -----------------------------------------------------------------------------------
async def set_block(services: Services, event: Event, channel: ReplyChannel, blocked: bool) -> None:
    """Blocks (or unblocks) duo requests from the person replied to or named."""
    people = partners_of(event)
    if len(people) != 1:
        raise UserFacingError("duo.block_who")
    storage: Any = services.storage
    await storage.block_duo(event.user.key, people[0].key, blocked)
    log.info("%s %s duo requests of %s", event.user.key, "blocked" if blocked else "unblocked", people[0].key)
    await channel.send_text(t("duo.blocked_done" if blocked else "duo.unblocked_done", event.language,
                              name=people[0].name or "?"))


# -- time and messages ----------------------------------------------------------------------------
async def resume_timers(services: Services) -> None:
    """Sets the answer clocks of requests still waiting (after a restart); expired ones close at once."""
    storage: Any = services.storage
    now = time.time()
    for request_id in await storage.waiting_duo_requests():
        request = await storage.duo_request(request_id)
        if request is not None:
            _start_timer(services, request_id, max(0.0, request.expires_at - now))


def _start_timer(services: Services, request_id: str, ttl: float) -> None:
    task = asyncio.get_running_loop().create_task(_expire_later(services, request_id, ttl),
                                                  name=f"duo-expiry-{request_id}")
    services.runtime.tasks.add(task)
    task.add_done_callback(services.runtime.tasks.discard)


async def _expire_later(services: Services, request_id: str, ttl: float) -> None:
    """After the answer time: a request still waiting expires and its requester is told."""
    await asyncio.sleep(ttl)
    storage: Any = services.storage
    try:
        if not await storage.close_duo_request(request_id, "expired"):
            return
        request = await storage.duo_request(request_id)
        if request is not None:
            log.info("duo request %s expired", request_id)
            await _tell_requester(services, request, "duo.expired")
    except Exception:
        log.warning("duo request %s: could not close it at its expiry", request_id, exc_info=True)


async def _tell_requester(services: Services, request: Any, code: str, **details: Any) -> None:
    lang = request.params.get("language") or "en"
    try:
        await services.channel_for(Chat.from_dict(request.chat)).send_text(t(code, lang, **details))
    except Exception:
        log.warning("duo request %s: could not tell its requester", request.id, exc_info=True)


async def _tell_privately(services: Services, user: User, code: str, keyboard: list[list[Button]] | None = None,
                          **details: Any) -> bool:
    """A private message where the platform lets the bot write first (Telegram: once they started it)."""
    try:
        chat = await services.private_chat(user)
        await services.channel_for(chat).send_text(t(code, user.language or "en", **details), keyboard)
        return True
    except Exception:
        log.info("could not write privately to %s", user.key)
        return False


async def _invite(services: Services, partner: User, requester: User) -> None:
    await _tell_privately(services, partner, "duo.invite", requester=requester.name or "?")


async def present_duo(services: Services, job: Any, artifacts: list[Any], channel: ReplyChannel, lang: str) -> None:
    """Sends the group portraits to the chat they were asked in, naming everyone in them."""
    names = ", ".join(n for n in job.params.get("names", []) if n) or "?"
    look: Any = None
    if job.params.get("template_id"):
        look = template.library().get(job.params["template_id"])
    elif services.styles:
        look = services.styles.get(job.params.get("style_id", ""))
    caption = t("duo.caption", lang, style=look.display_name(lang) if look else "", names=names)
    await present_default(services, job, artifacts, channel, lang, caption=caption)


registry.register_command("duo", ask_duo, "help.duo")
registry.register_command("group", ask_group, "help.group")
buttons.register_core_button(YES, press_yes)
buttons.register_core_button(NO, press_no)
register_presenter(KIND, present_duo)
register_presenter(TEMPLATE_KIND, present_duo)
