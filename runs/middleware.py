"""Answers that htmx and the browser can act on, whatever the view was doing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode, urlsplit

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings
from django.contrib import messages
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.shortcuts import render, resolve_url
from django.utils.cache import patch_cache_control

SESSION_ENDED = (
    "Your session ended, so that was not done. Log in again: you will come back to this page."
)


class HtmxSessionEndedMiddleware:
    """An htmx request whose session ended (logged out in another tab, expired) is answered
    with `login_required`'s redirect to the login page, which htmx would fetch and throw away:
    the button would do nothing, silently. Instead the whole page goes to the login page,
    which says why and comes back to the page the user was on.

    Sync and async, so async views (the stop path) keep running without a thread hop."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if iscoroutinefunction(self):
            return self._acall(request)
        return self._answer(request, self.get_response(request))

    async def _acall(self, request: HttpRequest) -> HttpResponseBase:
        response = await self.get_response(request)
        return self._answer(request, response)

    def _answer(self, request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
        login = resolve_url(settings.LOGIN_URL)
        if (
            request.headers.get("HX-Request") != "true"
            or response.status_code != 302
            or urlsplit(response.get("Location", "")).path != login
        ):
            return response
        current = urlsplit(request.headers.get("HX-Current-URL", ""))
        back = current.path + (f"?{current.query}" if current.query else "")
        messages.warning(request, SESSION_ENDED)
        answer = HttpResponse(status=204)
        answer["HX-Redirect"] = f"{login}?{urlencode({'next': back or '/'})}"
        return answer


# Features no page of Runbrake uses, off for any content that would try.
PERMISSIONS_POLICY = (
    "accelerometer=(), camera=(), geolocation=(), gyroscope=(), magnetometer=(), "
    "microphone=(), payment=(), usb=(), interest-cohort=()"
)


class PrivacyHeadersMiddleware:
    """`Permissions-Policy` everywhere; `Cache-Control: no-store` on what a logged-in user
    sees and on the JSON API (runs, prompts and outputs must not stay in shared or disk
    caches after logout). Sync and async."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if iscoroutinefunction(self):
            return self._acall(request)
        return self._headers(request, self.get_response(request))

    async def _acall(self, request: HttpRequest) -> HttpResponseBase:
        return self._headers(request, await self.get_response(request))

    def _headers(self, request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
        response.headers.setdefault("Permissions-Policy", PERMISSIONS_POLICY)
        # Whoever holds a session (or calls the API) gets private answers; deciding it from
        # the cookie costs no database read on the async stop path.
        private = request.path.startswith("/api/") or bool(
            request.COOKIES.get(settings.SESSION_COOKIE_NAME)
        )
        if private:
            patch_cache_control(response, no_store=True, private=True)
        return response


class FriendlyNotFoundMiddleware:
    """A missing page (or another team's, which looks the same) is Runbrake's own "Nothing
    here" page, also under DEBUG, where Django would show its technical 404 with the site's
    URL patterns to whoever asks. Under /api/ it is a JSON error; JSON answers keep theirs."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if iscoroutinefunction(self):
            return self._acall(request)
        return self._friendly(request, self.get_response(request))

    async def _acall(self, request: HttpRequest) -> HttpResponseBase:
        response: HttpResponseBase = await self.get_response(request)
        if self._wants_page(request, response):
            return await sync_to_async(self._page)(request)
        return response

    def _friendly(self, request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
        return self._page(request) if self._wants_page(request, response) else response

    @staticmethod
    def _wants_page(request: HttpRequest, response: HttpResponseBase) -> bool:
        return (
            response.status_code == 404
            and response.get("Content-Type", "").startswith("text/html")
            and request.headers.get("HX-Request") != "true"
        )

    @staticmethod
    def _page(request: HttpRequest) -> HttpResponseBase:
        if request.path.startswith("/api/"):
            # An API client (say /api/runs/abc, which no route matches) reads JSON errors.
            return JsonResponse(
                {
                    "error": {
                        "code": "NOT_FOUND",
                        "message": "No such API endpoint; see /api/openapi.json.",
                    }
                },
                status=404,
            )
        return render(request, "404.html", status=404)
