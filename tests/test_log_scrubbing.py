"""Fault 16: an exception or log record with a provider key in scope never prints the key.
The logging configuration is the real one (settings.LOGGING); the error is a real provider
error from the simulator, over HTTP."""

from __future__ import annotations

import io
import logging
import logging.config
import sys
import uuid
from collections.abc import Iterator

import pytest
from django.conf import settings

from runs.models import ApiToken, ProviderAccount
from runs.providers.errors import ProviderError

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """What settings.LOGGING's handlers print, captured: they are built anew on a stream of
    ours, and rebuilt on the real stderr afterwards."""
    captured = io.StringIO()
    real_stderr = sys.stderr
    sys.stderr = captured
    try:
        logging.config.dictConfig(settings.LOGGING)
    finally:
        sys.stderr = real_stderr
    yield captured
    logging.config.dictConfig(settings.LOGGING)


@pytest.mark.parametrize("kind", ["fay", "intelligencebox"])
async def test_a_provider_error_with_the_key_in_scope_logs_only_a_masked_key(
    kind, acme, bob, sim, log_output
):
    # Not shaped like any well-known key format: only the filter's knowledge of it can mask it.
    key = f"acme-live-{uuid.uuid4().hex}"
    base = {"fay": "/sim/fay/api/v1", "intelligencebox": "/sim/intelligencebox"}[kind]
    created = await ProviderAccount.objects.acreate(
        team=acme, kind=kind, name=kind, base_url=sim.url + base, api_key=key
    )
    account = await ProviderAccount.objects.aget(pk=created.pk)  # decrypted from the column
    provider = account.provider()
    logger = logging.getLogger("runs.watcher.watcher")
    try:
        await provider.check()  # the simulator refuses keys that do not start with sim-
    except ProviderError as error:
        # What careless code does with a key in scope: its config and headers in the
        # message, the key in an exception chained to the provider's error.
        logger.exception(
            "check failed with %r and headers %s", provider.config, provider.auth_headers()
        )
        try:
            raise RuntimeError(f"key {key} was refused") from error
        except RuntimeError:
            logger.exception("while checking the account")
    else:
        pytest.fail("the simulator accepted a key it must refuse")
    output = log_output.getvalue()
    assert "check failed with" in output
    assert "Traceback (most recent call last)" in output
    assert f"key ••••{key[-4:]} was refused" in output
    assert key not in output


def test_bearer_tokens_and_key_fields_are_masked(bob, log_output):
    token = ApiToken.issue(bob)
    logger = logging.getLogger("runs.web.api")
    logger.warning("refused request with Authorization: Bearer %s", token)
    logger.error("payload %s", {"api_key": "a-provider-key-0123456789", "prompt": "hello"})
    try:
        raise ValueError(f"x-api-key: sk-abcdefghijklmnop0123 for {token}")
    except ValueError:
        logging.getLogger("django.request").exception("Internal Server Error: /api/runs")
    output = log_output.getvalue()
    for secret in (token, "a-provider-key-0123456789", "sk-abcdefghijklmnop0123"):
        assert secret not in output
    assert "refused request with Authorization: Bearer" in output
    assert "Internal Server Error: /api/runs" in output
    assert "'prompt': 'hello'" in output
