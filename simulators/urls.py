from django.urls import include, path

from . import fay, views

app_name = "simulators"

urlpatterns = [
    path("requests", views.requests_log, name="requests"),
    path("health", views.health, name="health"),
    path("fay/api/v1/conversations", fay.create, name="fay-create"),
    path("fay/api/v1/conversation/<str:request_id>/status", fay.status, name="fay-status"),
    path("fay/api/v1/conversation/<str:request_id>/output", fay.output, name="fay-output"),
    path("fay/api/v1/conversation/<str:request_id>/stop", fay.stop, name="fay-stop"),
    path("fay/dashboard/webhooks", fay.dashboard_webhooks, name="fay-dashboard-webhooks"),
    path("dify/v1/", include("simulators.dify")),
    path("intelligencebox/", include("simulators.intelligencebox")),
    path("xpander/", include("simulators.xpander")),
]
