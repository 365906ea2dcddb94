"""Telegram: notifications and control of the trader and the model lifecycle, for authorised chats only."""
