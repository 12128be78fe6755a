"""Provider base URLs may not reach the server's own network outside development (SSRF)."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError

from runs.providers.base import ProviderConfig
from runs.providers.destinations import check_url, refused_reason
from runs.providers.errors import ProviderError
from runs.providers.fay import FayProvider


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "a loopback address"),
        ("::1", "a loopback address"),
        ("10.1.2.3", "a private network address"),
        ("192.168.1.10", "a private network address"),
        ("169.254.169.254", "a link-local address"),
        ("0.0.0.0", "a reserved address"),
        ("93.184.216.34", None),
    ],
)
def test_it_knows_which_addresses_are_off_limits(address, reason):
    assert refused_reason(address) == reason


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:8000/v1", "http://localhost/v1", "http://169.254.169.254/", "ftp://x"]
)
def test_internal_urls_are_refused_with_a_clear_message(url):
    with pytest.raises(ProviderError) as exc:
        check_url(url)
    assert exc.value.code == "DESTINATION_REFUSED"


def test_a_public_address_is_accepted():
    check_url("https://93.184.216.34/api/v1")


def test_an_account_is_refused_at_save_outside_development(acme, settings):
    from runs.models import ProviderAccount

    settings.RUNBRAKE_ALLOW_PRIVATE_PROVIDER_URLS = False
    account = ProviderAccount(
        team=acme,
        kind="fay",
        name="x",
        api_key="k",
        base_url="http://127.0.0.1:8000/sim/fay/api/v1",
    )
    with pytest.raises(ValidationError) as exc:
        account.full_clean()
    assert "loopback" in str(exc.value.message_dict["base_url"])
    settings.RUNBRAKE_ALLOW_PRIVATE_PROVIDER_URLS = True
    account.full_clean()  # the demo and tests call the simulators on loopback


async def test_a_call_to_an_internal_address_is_refused_before_connecting(fay_url, sim):
    provider = FayProvider(ProviderConfig(fay_url, "sim-ssrf-check", allow_private=False))
    before = len(sim.requests())
    with pytest.raises(ProviderError) as exc:
        await provider.status("abc")
    assert exc.value.code == "DESTINATION_REFUSED"
    assert len(sim.requests()) == before  # nothing reached the address
