"""Typed settings and topic names shared by every epcwatch process."""

from config.settings import Settings, get_settings

__all__ = ["Settings", "get_settings"]
