from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from runs.models import ApiToken


class Command(BaseCommand):
    help = "Issue a new API token for a user; the token is printed alone on the last line."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("username")

    def handle(self, *args: Any, username: str, **options: Any) -> None:
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"No user named {username!r}.")
        token = ApiToken.issue(user)
        self.stderr.write(f"API token for {username} (shown once; store it safely):")
        self.stdout.write(token)
