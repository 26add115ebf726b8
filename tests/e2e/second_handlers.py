"""Second instances of built-in handlers, for end-to-end tests that need two at once.

``LACUNA_HANDLERS=tests.e2e.second_handlers:ArchiveStorage`` is a ``storage`` handler
named ``archive`` (settings ``LACUNA_ARCHIVE_*``); ``...:SecondEmail`` an ``email``
handler named ``mail2`` (``LACUNA_MAIL2_*``).
"""

from __future__ import annotations

from lacuna_webhooks.handlers.email import EmailHandler
from lacuna_webhooks.handlers.storage import StorageHandler


class ArchiveStorage(StorageHandler):
    name = "archive"


class SecondEmail(EmailHandler):
    name = "mail2"
