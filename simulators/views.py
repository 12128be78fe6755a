from __future__ import annotations

import hmac

from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from . import core


def _refused(status: int, code: str, message: str) -> JsonResponse:
    return JsonResponse({"error": {"code": code, "message": message}}, status=status)


def _token_ok(request: HttpRequest) -> bool:
    token = settings.RUNBRAKE_SIM_INSPECT_TOKEN
    given = request.headers.get("X-Sim-Inspect-Token", "")
    return bool(token) and hmac.compare_digest(given.encode(), token.encode())


@csrf_exempt
async def requests_log(request: HttpRequest) -> JsonResponse:
    """Every request a simulator received (prompts included): tests and staff check what
    reached the provider. Anyone else on the network must not read every team's prompts, so
    it takes the inspection token (`RUNBRAKE_SIM_INSPECT_TOKEN`) or a staff session; clearing
    it takes the token."""
    if request.method not in ("GET", "DELETE"):
        return _refused(405, "METHOD_NOT_ALLOWED", "Use GET or DELETE.")
    if request.method == "DELETE":
        if not _token_ok(request):
            return _refused(403, "FORBIDDEN", "Clearing the log takes the inspection token.")
        core.clear_log()
        return JsonResponse({"requests": []})
    user = await request.auser()
    if not (_token_ok(request) or getattr(user, "is_staff", False)):
        return _refused(
            403,
            "FORBIDDEN",
            "The simulators' request log is for staff (log in to the admin) or the "
            "inspection token.",
        )
    return JsonResponse({"requests": core.requests_for(request.GET.get("provider"))})


async def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ok": True})
