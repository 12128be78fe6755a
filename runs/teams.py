"""Team management pages (being written)."""

from django.http import HttpRequest, HttpResponse


def members(request: HttpRequest, team_id: int) -> HttpResponse:
    return HttpResponse("Members coming soon.")


def accounts(request: HttpRequest, team_id: int) -> HttpResponse:
    return HttpResponse("Provider accounts coming soon.")


def test_account(request: HttpRequest, team_id: int, pk: int) -> HttpResponse:
    return HttpResponse("Test connection coming soon.")
