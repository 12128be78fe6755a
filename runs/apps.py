from django.apps import AppConfig


class RunsConfig(AppConfig):
    name = "runs"
    verbose_name = "Runs"

    def ready(self) -> None:
        from runs.realtime import signals  # noqa: F401 - connects the receivers
        from runs.security import crypto

        # A bad encryption key must stop start-up, not the first save of a provider account.
        crypto.check_keys()
