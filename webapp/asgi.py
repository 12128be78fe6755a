import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")
# Django must be set up before anything imports models (the channels tutorial's order).
django_asgi_app = get_asgi_application()

from django.conf import settings  # noqa: E402

if settings.DEBUG:
    # What runserver does: without it `manage.py serve` answers 404 for every /static/ file.
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

    django_asgi_app = ASGIStaticFilesHandler(django_asgi_app)

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from runs.realtime.origin import SameOriginValidator  # noqa: E402
from runs.realtime.routing import websocket_urlpatterns  # noqa: E402
from runs.realtime.wsauth import SessionUserMiddleware  # noqa: E402
from runs.watcher.lifespan import lifespan  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        # Scheme, host and port of the page must be the site's own (runs/realtime/origin.py);
        # the user is read from the session once, and only the user is kept
        # (runs/realtime/wsauth.py). (The ignore: django-stubs calls path()'s result a
        # URLPattern, the channels stubs want their own subtype of it; runs/realtime/routing.py
        # builds them with path() as documented.)
        "websocket": SameOriginValidator(
            SessionUserMiddleware(URLRouter(websocket_urlpatterns))  # type: ignore[arg-type]
        ),
        # uvicorn sends lifespan events; daphne does not, so `manage.py serve` starts the
        # watcher itself once daphne is listening.
        "lifespan": lifespan,
    }
)
