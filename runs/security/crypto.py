"""Provider API keys at rest: Fernet with rotation (the first key encrypts, all decrypt)."""

from __future__ import annotations

import functools
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import models

from runs.security.logscrub import remember


@functools.cache
def _fernet() -> MultiFernet:
    try:
        return MultiFernet([Fernet(key) for key in settings.RUNBRAKE_ENCRYPTION_KEYS])
    except (ValueError, TypeError):
        raise ImproperlyConfigured(
            "RUNBRAKE_ENCRYPTION_KEYS holds a value that is not a Fernet key "
            "(32 url-safe base64-encoded bytes)."
        ) from None


def check_keys() -> None:
    _fernet()


def encrypt(plaintext: str) -> str:
    # Every key this process handles becomes known to the log filter.
    remember(plaintext)
    return _fernet().encrypt(plaintext.encode()).decode()


def decrypt(token: str) -> str:
    try:
        plaintext = _fernet().decrypt(token.encode()).decode()
    except InvalidToken:
        raise ImproperlyConfigured(
            "A stored provider key cannot be decrypted with RUNBRAKE_ENCRYPTION_KEYS: "
            "keep the old key in the list until every row is re-encrypted."
        ) from None
    # Every key this process handles becomes known to the log filter.
    remember(plaintext)
    return plaintext


def rotate(token: str) -> str:
    return _fernet().rotate(token.encode()).decode()


class EncryptedTextField(models.TextField[str, str]):
    """Plaintext in Python, Fernet ciphertext in the column."""

    def from_db_value(self, value: str | None, expression: Any, connection: Any) -> str | None:
        if value is None or value == "":
            return value
        return decrypt(value)

    def get_prep_value(self, value: Any) -> Any:
        value = super().get_prep_value(value)
        if value is None or value == "":
            return value
        return encrypt(value)
