"""The Django app config of ``aperturedb_pool.django`` (add it to ``INSTALLED_APPS``)."""

from __future__ import annotations

from django.apps import AppConfig
from django.core import checks

__all__ = ["ApertureDBPoolConfig"]


class ApertureDBPoolConfig(AppConfig):  # type: ignore[misc]  # (Django is untyped here)
    name = "aperturedb_pool.django"
    label = "aperturedb_pool"
    verbose_name = "ApertureDB connection pool"

    def ready(self) -> None:
        from aperturedb_pool.django import _connect_setting_changed, check_settings

        checks.register(check_settings, "aperturedb")
        _connect_setting_changed()
