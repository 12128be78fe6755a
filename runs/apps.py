from django.apps import AppConfig


class RunsConfig(AppConfig):
    name = "runs"
    verbose_name = "Runs"

    def ready(self) -> None:
        from . import crypto, signals  # noqa: F401 - connects the receivers

        # A bad encryption key must stop start-up, not the first save of a provider account.
        crypto.check_keys()
