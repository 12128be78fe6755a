#!/usr/bin/env python
import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings")
    from django.core.management import execute_from_command_line
    from django.db.utils import OperationalError, ProgrammingError

    try:
        execute_from_command_line(sys.argv)
    except (OperationalError, ProgrammingError) as error:
        # A command run before the first migrate (say `issue_token bob` on a fresh clone) would
        # otherwise end in a page of traceback about a missing table.
        words = str(error)
        if "no such table" not in words and not ("relation" in words and "does not exist" in words):
            raise
        sys.exit(
            f"The database has no Runbrake tables yet ({words.splitlines()[0]}).\n"
            "Run `.venv/bin/python manage.py migrate` first (`make run` does it for you)."
        )


if __name__ == "__main__":
    main()
