from django.urls import path

from . import api, views

app_name = "runs"

urlpatterns = [
    path("", views.home, name="home"),
    path("teams/<int:team_id>/runs/", views.team_runs, name="team"),
    path("teams/<int:team_id>/runs/launch", views.launch_run, name="launch"),
    path("runs/<int:pk>/", views.run_detail, name="detail"),
    path("runs/<int:pk>/stop", views.stop_run, name="stop"),
    path("api/provider-accounts", api.provider_accounts, name="api-provider-accounts"),
    path("api/runs", api.runs, name="api-runs"),
    path("api/runs/<int:pk>", api.run_detail, name="api-run"),
    path("api/runs/<int:pk>/stop", api.stop_run, name="api-stop"),
]
