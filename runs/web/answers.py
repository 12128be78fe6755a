"""What every page view answers besides its own page: the request type our views receive, a
toast, a refusal in words, and "too many" with when to try again."""

from __future__ import annotations

from django.contrib.auth.models import User
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.shortcuts import render
from django_htmx.http import trigger_client_event
from django_htmx.middleware import HtmxDetails

from runs.security.ratelimit import Limited


class HtmxRequest(HttpRequest):
    """A request django-htmx's middleware has seen; its user may be anonymous."""

    htmx: HtmxDetails


class HtmxHttpRequest(HtmxRequest):
    """What our views receive: login_required has run, and django-htmx's middleware."""

    user: User


def toast(response: HttpResponseBase, message: str, level: str = "info") -> HttpResponseBase:
    # Aimed at <body>: htmx fires it on the requesting element otherwise, and a Cancel form
    # that a push replaced meanwhile is detached, so the event would reach no listener.
    return trigger_client_event(
        response, "toast", {"level": level, "message": message, "target": "body"}
    )


def refused(request: HttpRequest, message: str, status: int = 403) -> HttpResponseBase:
    """A refusal in words: a toast for htmx (and nothing swapped), else a readable page."""
    if request.headers.get("HX-Request") == "true":  # django-htmx's test, before its middleware
        response = HttpResponse(message, status=status)
        response["HX-Reswap"] = "none"
        return toast(response, message, "error")
    return render(request, "runs/refused.html", {"message": message}, status=status)


def too_many(request: HttpRequest, limited: Limited) -> HttpResponseBase:
    response = refused(request, limited.message, status=429)
    response["Retry-After"] = str(limited.retry_after)
    return response
