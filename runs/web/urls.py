from django.urls import path

from runs.web import api, dashboard, openapi, teams, tokens, views, webhooks

app_name = "runs"

urlpatterns = [
    path("", views.home, name="home"),
    path("teams/<int:team_id>/runs/", views.team_runs, name="team"),
    path("teams/<int:team_id>/runs/launch", views.launch_run, name="launch"),
    path("teams/<int:team_id>/dashboard/", dashboard.team_dashboard, name="dashboard"),
    path("teams/<int:team_id>/members/", teams.members, name="members"),
    path("teams/<int:team_id>/accounts/", teams.accounts, name="accounts"),
    path("teams/<int:team_id>/accounts/<int:pk>/test", teams.test_account, name="account-test"),
    path("runs/<int:pk>/", views.run_detail, name="detail"),
    path("runs/<int:pk>/output.txt", views.run_output, name="output"),
    path("runs/<int:pk>/stop", views.stop_run, name="stop"),
    path("runs/<int:pk>/again", views.run_again, name="again"),
    path("runs/<int:pk>/retry-stop", views.retry_stop, name="retry-stop"),
    path("runs/<int:pk>/force-stop", views.force_stop, name="force-stop"),
    path("teams/<int:team_id>/runs/stop", views.bulk_stop, name="bulk-stop"),
    path("api/openapi.json", openapi.openapi, name="api-openapi"),
    path("api/provider-accounts", api.provider_accounts, name="api-provider-accounts"),
    path("api/runs", api.runs, name="api-runs"),
    path("api/runs/stop", api.stop_many, name="api-stop-many"),
    path("api/runs/<int:pk>", api.run_detail, name="api-run"),
    path("api/runs/<int:pk>/stop", api.stop_run, name="api-stop"),
    path("hooks/fay/<str:token>", webhooks.fay_webhook, name="fay-webhook"),
    path("account/tokens/", tokens.tokens, name="tokens"),
]
