"""Imports every feature module, so each registers its commands, buttons and presenters.

The service imports this once before its adapters start (the command menu is built from it, in
this order). A new feature adds one line here.
"""
from handlers import basic  # noqa: F401  /start /help /status /cancel /delete
from handlers import selfie  # noqa: F401  photos become selfies
from handlers import portrait  # noqa: F401  /style /styles /train
from handlers import cartoon  # noqa: F401  /cartoon
from handlers import talk  # noqa: F401  /talk
from handlers import tryon  # noqa: F401  /tryon
from handlers import studio  # noqa: F401  Vary and Again under portraits
from handlers import studio_panel  # noqa: F401  the options panel: aspect, likeness, pose, count as buttons
from handlers import template  # noqa: F401  /template
from handlers import imagine  # noqa: F401  /imagine
from handlers import duo  # noqa: F401  /duo /group: portraits of consenting members together
from handlers import fast  # noqa: F401  fast mode: /style NAME fast, the panel's Speed row, the operator's default
from handlers import makestyle  # noqa: F401  /makestyle: new styles from example pictures
from handlers import language  # noqa: F401  /language
from handlers import sharing  # noqa: F401  Share button, inline results, Discord "post to channel"
from handlers import chat_settings  # noqa: F401  /settings in groups, group rules before commands and jobs
from handlers import safety  # noqa: F401  Report button, /privacy, /quota, /admin, bans
from handlers import enhance  # noqa: F401  Enhance / Upscale (after safety: its button joins the Report row)
