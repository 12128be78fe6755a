"""Provider webhooks: Fay pushes a run's news, signed, instead of being polled for it.

Each Fay account has its own URL (`/hooks/fay/<token>`, shown on the accounts page to paste
into Fay's dashboard) and the secret Fay generated for it (stored encrypted, like the key).
A delivery is verified on its raw body in constant time, applied once per event id (Fay may
deliver an event more than once and retries three times), and answered at once: Fay expects
an answer within 5 s, and applying is one small transaction.
"""

from __future__ import annotations

import logging

from django.core.exceptions import RequestDataTooBig
from django.db import IntegrityError, transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from runs.models import ACTIVE, ProviderAccount, ProviderKind, Run, Status, WebhookEvent
from runs.providers import ProviderError
from runs.providers.base import Finished, Running
from runs.providers.fay import SIGNATURE_HEADER, WebhookNews, parse_webhook, signature_ok

logger = logging.getLogger(__name__)


def _error(status: int, code: str, message: str) -> JsonResponse:
    return JsonResponse({"error": {"code": code, "message": message}}, status=status)


@csrf_exempt  # signed by the provider, not a browser form
@require_POST
def fay_webhook(request: HttpRequest, token: str) -> JsonResponse:
    account = ProviderAccount.objects.filter(kind=ProviderKind.FAY, webhook_token=token).first()
    if account is None or not account.webhook_secret:
        return _error(404, "NOT_FOUND", "No Fay account receives webhooks at this address.")
    try:
        body = request.body
    except RequestDataTooBig:
        return _error(413, "TOO_LARGE", "The webhook body is larger than Runbrake accepts.")
    if not signature_ok(body, request.headers.get(SIGNATURE_HEADER, ""), account.webhook_secret):
        logger.warning(
            "Fay webhook for account %s refused: bad or missing %s (from %s)",
            account.pk,
            SIGNATURE_HEADER,
            request.META.get("REMOTE_ADDR"),
        )
        return _error(401, "BAD_SIGNATURE", "The webhook signature does not match.")
    try:
        news = parse_webhook(body)
    except ProviderError as exc:
        return _error(400, exc.code, exc.message)
    run = Run.objects.filter(provider_account=account, external_id=news.external_id).first()
    if run is None and _start_in_flight(account):
        # Fay may speak before its create call's answer is saved here: not applied, not
        # recorded, so Fay's retry of this delivery finds the run.
        return _error(409, "RUN_NOT_KNOWN_YET", "No run has this id yet; deliver it again.")
    try:
        with transaction.atomic():
            WebhookEvent.objects.create(account=account, event_id=news.event_id, kind=news.kind)
            applied = _apply(run, news)
    except IntegrityError:
        # A redelivery of an event already applied: answered, changes nothing.
        return JsonResponse({"status": "ok", "duplicate": True})
    return JsonResponse({"status": "ok", "applied": applied})


def _start_in_flight(account: ProviderAccount) -> bool:
    return (
        Run.objects.filter(provider_account=account, external_id="", status__in=ACTIVE)
        .exclude(start_attempted_at=None)
        .exists()
    )


def _apply(run: Run | None, news: WebhookNews) -> bool:
    """Apply the news to the run (a run not launched by Runbrake is answered and ignored)."""
    if run is None or news.event is None:
        return False
    match news.event:
        case Running(provider_status=provider_status):
            if run.status == Status.PENDING:
                return run.mark_running(provider_status)
            return run.record_progress(provider_status)
        case Finished() as finished:
            output = finished.output if finished.output is not None else run.output
            return run.settle(finished, output=output, label="Fay")
