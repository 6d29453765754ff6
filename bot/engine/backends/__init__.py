"""Where worker processes run: ``local`` (child processes of the bot) or ``ray`` (actors on a cluster)."""
