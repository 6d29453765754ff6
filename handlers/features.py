"""Imports every feature module, so each registers its commands, buttons and presenters.

The service imports this once before its adapters start (the command menu is built from it, in
this order). A new feature adds one line here.
"""
from handlers import basic  # noqa: F401  /start /help /status /cancel /delete
from handlers import selfie  # noqa: F401  photos become selfies
from handlers import portrait  # noqa: F401  /style /styles /train
from handlers import cartoon  # noqa: F401  /cartoon
