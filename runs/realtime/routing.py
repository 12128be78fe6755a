from django.urls import path

from runs.realtime import consumers

websocket_urlpatterns = [
    path("ws/teams/<int:team_id>/", consumers.TeamRunsConsumer.as_asgi()),
    path("ws/runs/<int:run_id>/", consumers.RunConsumer.as_asgi()),
]
