from django.conf import settings
from django.contrib import admin
from django.urls import include, path
from django.views.generic import RedirectView

from runs.web import health, login

urlpatterns = [
    # Browsers (and the admin's pages) ask for it at the root.
    path("favicon.ico", RedirectView.as_view(url="/static/img/favicon.svg", permanent=True)),
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("admin/", admin.site.urls),
    # Our login (rate limited) shadows the one in django.contrib.auth.urls.
    path("accounts/login/", login.login, name="login"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("", include("runs.web.urls")),
]

if settings.RUNBRAKE_SIMULATORS:
    urlpatterns.append(path("sim/", include("simulators.urls")))
