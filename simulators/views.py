from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from . import core


@csrf_exempt
async def requests_log(request: HttpRequest) -> JsonResponse:
    """Every request a simulator received: tests check what reached the provider."""
    if request.method == "DELETE":
        core.clear_log()
        return JsonResponse({"requests": []})
    if request.method != "GET":
        return JsonResponse(
            {"error": {"code": "METHOD_NOT_ALLOWED", "message": "Use GET or DELETE."}}, status=405
        )
    return JsonResponse({"requests": core.requests_for(request.GET.get("provider"))})


async def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"ok": True})
