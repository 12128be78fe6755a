"""Deliberately broken builds for the chaos soak's own test (tests/test_chaos_soak.py): the
harness puts this directory on PYTHONPATH of the web and watcher processes with CHAOS_BREAK
set, so the product code stays untouched and the checker must find the bug from the history.

- `stop_commit`: the stop intent is rolled back instead of committed before the provider call
  (the API still answers 200), so the stop is lost.

(A "late completed applied after Stopped" build is not here: the soak's workload produced no
late provider result in its runs, so such a build would pass it. See docs/RELIABILITY.md.)
"""

from __future__ import annotations

import os
from typing import Any

BREAK = os.environ.get("CHAOS_BREAK", "")


class _RolledBack(Exception):
    pass


def _break_models() -> None:
    from django.db import transaction

    from runs import models

    if BREAK == "stop_commit":
        request_stop = models.Run.request_stop

        def lost_request_stop(self: Any, **kwargs: Any) -> bool:
            try:
                with transaction.atomic():
                    request_stop(self, **kwargs)
                    raise _RolledBack
            except _RolledBack:
                pass
            self.refresh_from_db()
            return True

        models.Run.request_stop = lost_request_stop  # type: ignore[method-assign]


if BREAK:
    from runs.apps import RunsConfig

    ready = RunsConfig.ready

    def broken_ready(self: RunsConfig) -> None:
        ready(self)
        _break_models()

    RunsConfig.ready = broken_ready  # type: ignore[method-assign]
