from django.urls import path

from runs.realtime import consumers

# django-stubs types path()'s view as an HTTP view; Channels' URLRouter routes ASGI
# applications with it (its documented use), hence the two ignores.
websocket_urlpatterns = [
    path("ws/teams/<int:team_id>/", consumers.TeamRunsConsumer.as_asgi()),  # type: ignore[arg-type]
    path("ws/runs/<int:run_id>/", consumers.RunConsumer.as_asgi()),  # type: ignore[arg-type]
]
