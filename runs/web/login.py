"""Logging in, Runbrake's form or the admin's, with failed attempts limited."""

from __future__ import annotations

import unicodedata
from collections.abc import Callable

from django.contrib.auth.views import LoginView
from django.http import HttpRequest, HttpResponseBase

from runs.security.ratelimit import hit, peek
from runs.web.answers import too_many


def login(request: HttpRequest) -> HttpResponseBase:
    """Django's login, with failed attempts limited (see `throttled_login`)."""
    return throttled_login(request, LoginView.as_view())


def login_name(raw: str) -> str:
    """The username as Django authenticates it (stripped, NFKC-normalised), case-folded: a
    respelling ("  carol ", fullwidth letters, "Carol") is the same guesser."""
    return unicodedata.normalize("NFKC", (raw or "").strip()).casefold()[:150]


def throttled_login(
    request: HttpRequest, view: Callable[[HttpRequest], HttpResponseBase]
) -> HttpResponseBase:
    """A login form, Runbrake's or the admin's, with failed attempts limited per client address
    and username, and per username from anywhere (higher). Successful logins count for
    nothing, so an attacker slows down without the owner being locked out for long."""
    if request.method != "POST":
        return view(request)
    name = login_name(request.POST.get("username", ""))
    buckets = [("login", f"{request.META.get('REMOTE_ADDR', '?')}:{name}"), ("login_name", name)]
    for scope, who in buckets:
        if limited := peek(scope, who):
            return too_many(request, limited)
    answer = view(request)
    if not request.user.is_authenticated:
        for scope, who in buckets:
            hit(scope, who)
    return answer
