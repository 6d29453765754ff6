"""The environment a worker process starts with: the service's, without its secrets.

Workers parse untrusted media (photos, audio, video) with native libraries; a bug there must not hand
over the bot tokens. Dropped: every ``FACECHAIN_*`` variable whose name says it holds a secret
(``FACECHAIN_TELEGRAM_TOKEN``, ``FACECHAIN_DISCORD_TOKEN``, ...) and any variable whose value holds a
configured secret, whatever its name.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

SECRET_NAME = re.compile(r"FACECHAIN_\w*(TOKEN|SECRET|PASSWORD|KEY)", re.IGNORECASE)
# Set for every worker: its messages are not held in a buffer, and no library draws tqdm bars
# ("Loading pipeline components...") into the service's log; users see progress through the protocol.
WORKER_SETTINGS = {"PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}


def worker_environment(base: Mapping[str, str], secrets: Iterable[str] = ()) -> dict[str, str]:
    """`base` without secret-named FACECHAIN_ variables and without any variable holding one of `secrets`."""
    values = [s for s in secrets if s]
    return {name: value for name, value in base.items()
            if not SECRET_NAME.fullmatch(name) and not any(secret in value for secret in values)}
