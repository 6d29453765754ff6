"""The chat platforms: Telegram and Discord adapters, turning updates into events and back."""
