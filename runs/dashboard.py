"""The team dashboard (being written)."""

from django.http import HttpRequest, HttpResponse


def team_dashboard(request: HttpRequest, team_id: int) -> HttpResponse:
    return HttpResponse("Dashboard coming soon.")
