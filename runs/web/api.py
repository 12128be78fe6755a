"""The JSON API for scripts and integrations. Bearer-token auth; errors are
`{"error": {"code", "message"}}` with the matching HTTP status."""

from __future__ import annotations

import base64
import binascii
import functools
import json
from collections.abc import Callable, Coroutine
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.core.exceptions import RequestDataTooBig
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt

from runs.access import amembership_for, run_to_stop
from runs.models import (
    ApiToken,
    Channel,
    IdempotencyConflict,
    Membership,
    ProviderAccount,
    ProviderKind,
    Run,
    RunAlreadyFinished,
    Status,
    astop_each,
)
from runs.security.hostile import MAX_DEPTH, as_id, as_whole_number, json_problem
from runs.security.ratelimit import Limited, ahit, hit
from runs.web.answers import HtmxHttpRequest
from runs.web.forms import JSON_FIELDS, OPTIONS_BY_KIND, LaunchForm

PAGE_SIZE = 50
MAX_PAGE_SIZE = 200

# Async views (django-stubs' path() takes coroutine functions as such).
ApiView = Callable[..., Coroutine[Any, Any, JsonResponse]]


def error(status: int, code: str, message: str, **extra: Any) -> JsonResponse:
    return JsonResponse({"error": {"code": code, "message": message, **extra}}, status=status)


def too_many(limited: Limited) -> JsonResponse:
    response = error(429, "RATE_LIMITED", limited.message, retry_after=limited.retry_after)
    response["Retry-After"] = str(limited.retry_after)
    return response


def bearer_token(request: HtmxHttpRequest) -> str:
    header = request.headers.get("Authorization", "")
    return header[7:].strip() if header.startswith("Bearer ") else ""


def unauthenticated() -> JsonResponse:
    response = error(
        401,
        "UNAUTHENTICATED",
        "Send a valid token as 'Authorization: Bearer <token>' "
        "(create one with `manage.py issue_token <username>`).",
    )
    response["WWW-Authenticate"] = 'Bearer realm="runbrake"'
    return response


def api_view(*methods: str, authenticates: bool = False) -> Callable[[ApiView], ApiView]:
    """Token auth, method check and JSON errors, once for every API endpoint.

    A view that `authenticates` looks its token up itself, in the thread hop of its own
    database work (the stop path): on its methods it is called with an anonymous
    `request.user`, and answers `unauthenticated()` when `ApiToken.user_for` finds no one."""

    def decorate(view: ApiView) -> ApiView:
        @csrf_exempt
        @functools.wraps(view)
        async def wrapper(request: HtmxHttpRequest, *args: Any, **kwargs: Any) -> JsonResponse:
            token = bearer_token(request)
            if authenticates and token and request.method in methods:
                # Never the session's user: the API is exempt from CSRF checks.
                request.user = AnonymousUser()  # type: ignore[assignment]
                return await view(request, *args, **kwargs)
            user = await sync_to_async(ApiToken.user_for)(token) if token else None
            if user is None:
                return unauthenticated()
            if request.method not in methods:
                response = error(
                    405, "METHOD_NOT_ALLOWED", f"Use {' or '.join(methods)} on this endpoint."
                )
                response["Allow"] = ", ".join(methods)
                return response
            request.user = user
            return await view(request, *args, **kwargs)

        return wrapper

    return decorate


def read_json(request: HtmxHttpRequest) -> dict[str, Any] | JsonResponse:
    try:
        raw = request.body
    except RequestDataTooBig:
        # Django refuses to read a body past DATA_UPLOAD_MAX_MEMORY_SIZE; say so in our format
        # (it would otherwise be an HTML 400 page).
        return error(
            413,
            "BODY_TOO_LARGE",
            f"The request body is larger than {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes.",
        )
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        return error(400, "INVALID_JSON", f"The request body is not valid JSON: {exc}.")
    except RecursionError:
        return error(
            400,
            "INVALID_JSON",
            f"The request body is nested too deeply ({MAX_DEPTH} levels at most).",
        )
    if not isinstance(body, dict):
        return error(400, "INVALID_JSON", "The request body must be a JSON object.")
    if problem := json_problem(body):
        return error(400, "INVALID_JSON", f"The request body {problem}.")
    return body


def iso(value: Any) -> str | None:
    return value.isoformat() if value else None


def run_json(run: Run) -> dict[str, Any]:
    stop = None
    if run.stop_requested_at:
        stop = {
            "requested_at": iso(run.stop_requested_at),
            "requested_by": run.stop_requested_by.get_username() if run.stop_requested_by else None,
            "channel": run.stop_channel,
            "reason": run.stop_reason,
            "provider_answer": run.stop_answer,
            "error": run.stop_error or None,
            "attempts": run.stop_attempts,
            "confirmed_at": iso(run.stop_confirmed_at),
            "confirmation": run.stop_confirmation or None,
            "proof": run.proof or None,
            "latency_ms": run.stop_latency_ms,
            "finished_before_stop": run.finished_before_stop,
        }
    return {
        "id": run.pk,
        "team": run.team_id,
        "provider_account": run.provider_account_id,
        "provider": run.provider,
        "status": run.status,
        "external_id": run.external_id or None,
        "prompt": run.prompt,
        "options": run.options,
        "timeout_seconds": run.timeout_seconds,
        "no_progress_seconds": run.no_progress_seconds,
        "output": run.output,
        # The stream was lost and the provider gave no text after that point.
        "output_incomplete": run.output_incomplete,
        "structured_output": run.structured_output,
        "error": run.error or None,
        # What proved the final state (a Proof value), once there is one.
        "proof": run.proof or None,
        "usage": run.usage,
        "queued": run.is_queued,
        "quota_wait": {
            "endpoint": run.quota_endpoint,
            "until": iso(run.quota_until),
            "reason": run.quota_reason,
        }
        if run.quota_endpoint
        else None,
        "created_by": run.created_by.get_username() if run.created_by else None,
        "created_at": iso(run.created_at),
        "started_at": iso(run.started_at),
        "finished_at": iso(run.finished_at),
        "stop": stop,
    }


def _runs(user: Any) -> Any:
    return Run.objects.for_user(user).select_related("created_by", "stop_requested_by")


@api_view("GET")
async def provider_accounts(request: HtmxHttpRequest) -> JsonResponse:
    """The accounts of the user's teams. Viewers get names only (the accounts page refuses
    them too); members and admins, who launch on them, also the address and masked key."""
    accounts = ProviderAccount.objects.for_user(request.user).order_by("team_id", "name")
    launches = {m.team_id: m.can_launch async for m in Membership.objects.filter(user=request.user)}
    results = []
    async for a in accounts:
        entry: dict[str, Any] = {"id": a.pk, "team": a.team_id, "kind": a.kind, "name": a.name}
        if launches.get(a.team_id):
            entry.update(
                base_url=a.base_url,
                api_key=a.masked_key,
                quota_tier=a.quota_tier,
                quota=a.limits,
                webhooks=a.receives_webhooks,
            )
        results.append(entry)
    return JsonResponse({"results": results})


def _not_one_of(value: str, choices: list[str], field: str, unknown: str) -> JsonResponse | None:
    """The 400 for a query parameter outside its choices, naming them; None when it is one."""
    if value in choices:
        return None
    return error(
        400, "VALIDATION_ERROR", f"{unknown}; use one of {', '.join(choices)}.", field=field
    )


@api_view("GET", "POST")
async def runs(request: HtmxHttpRequest) -> JsonResponse:
    if request.method == "POST":
        return await _create_run(request)
    qs = _runs(request.user).order_by("-id")
    params = request.GET
    if status := params.get("status"):
        if refused := _not_one_of(status, Status.values, "status", f"Unknown status {status!r}"):
            return refused
        qs = qs.filter(status=status)
    if team := params.get("team"):
        if (team_id := as_id(team)) is None:
            return error(400, "VALIDATION_ERROR", "team must be a team id.", field="team")
        qs = qs.filter(team_id=team_id)
    if provider := params.get("provider"):
        if refused := _not_one_of(provider, ProviderKind.values, "provider", "Unknown provider"):
            return refused
        qs = qs.filter(provider=provider)
    if cursor := params.get("cursor"):
        try:
            before = as_id(base64.urlsafe_b64decode(cursor.encode()).decode())
        except (ValueError, binascii.Error, UnicodeDecodeError):
            before = None
        if before is None:
            return error(400, "VALIDATION_ERROR", "cursor is not one we issued.", field="cursor")
        qs = qs.filter(pk__lt=before)
    limit = as_whole_number(params.get("limit", PAGE_SIZE), maximum=MAX_PAGE_SIZE)
    if limit is None:
        # Refused rather than quietly clamped: a client asking for 500 would otherwise believe
        # a short page meant the end of the list.
        return error(
            400,
            "VALIDATION_ERROR",
            f"limit must be a whole number from 1 to {MAX_PAGE_SIZE}.",
            field="limit",
        )
    page = [run async for run in qs[: limit + 1]]
    next_cursor = None
    if len(page) > limit:
        page = page[:limit]
        next_cursor = base64.urlsafe_b64encode(str(page[-1].pk).encode()).decode()
    return JsonResponse({"results": [run_json(r) for r in page], "next_cursor": next_cursor})


async def _create_run(request: HtmxHttpRequest) -> JsonResponse:
    key = request.headers.get("Idempotency-Key", "").strip()
    if len(key) > 200:
        return error(
            400,
            "VALIDATION_ERROR",
            "Idempotency-Key is at most 200 characters.",
            field="Idempotency-Key",
        )
    body = read_json(request)
    if isinstance(body, JsonResponse):
        return body
    account = await _account_to_launch_on(request.user, body)
    if isinstance(account, JsonResponse):
        return account
    if limited := await ahit("launch", str(request.user.pk)):
        return too_many(limited)
    data = _form_data(body, account)
    if isinstance(data, JsonResponse):
        return data
    form = await sync_to_async(_validated_form)(data, account, request.user.get_username())
    if form.errors:
        field, messages = next(iter(form.errors.items()))
        name = "options" if field in {o for k in OPTIONS_BY_KIND.values() for o in k} else field
        return error(
            400,
            "VALIDATION_ERROR",
            f"{name}: {' '.join(str(m) for m in messages)}",
            field=name,
            fields={k: list(v) for k, v in form.errors.items()},
        )
    try:
        run = await sync_to_async(form.launch)(
            request.user, channel=Channel.API, idempotency_key=key
        )
    except IdempotencyConflict as exc:
        return error(422, "IDEMPOTENCY_KEY_REUSED", str(exc), run_id=exc.run.pk)
    replayed = run.was_replayed
    run = await _runs(request.user).aget(pk=run.pk)
    response = JsonResponse(run_json(run), status=201)
    if replayed:
        response["Idempotent-Replayed"] = "true"
    return response


async def _account_to_launch_on(user: Any, body: dict[str, Any]) -> ProviderAccount | JsonResponse:
    """The body's provider account, if it is in one of the user's teams and they may launch
    there; else the error to answer."""
    account_id = body.get("provider_account")
    if not isinstance(account_id, int):
        return error(
            400,
            "VALIDATION_ERROR",
            "provider_account is required: the id of one of your provider accounts.",
            field="provider_account",
        )
    account = await (
        ProviderAccount.objects.for_user(user).select_related("team").filter(pk=account_id).afirst()
    )
    if account is None:
        return error(
            400,
            "VALIDATION_ERROR",
            f"No provider account {account_id} in your teams.",
            field="provider_account",
        )
    membership = await amembership_for(user, account.team_id)
    if not membership.can_launch:
        return error(403, "FORBIDDEN", "Viewers can watch runs but not launch them.")
    return account


def _form_data(body: dict[str, Any], account: ProviderAccount) -> dict[str, Any] | JsonResponse:
    """The JSON body as the launch form's data, so that the API and the page validate a
    launch with the same rules; the API is strict where the form is lenient (types)."""
    for name in ("timeout_seconds", "no_progress_seconds"):
        value = body.get(name, 0)
        # The form reads {} as "not given" and "90" as 90.
        if isinstance(value, bool) or not isinstance(value, int):
            return error(
                400, "VALIDATION_ERROR", f"{name} must be a whole number of seconds.", field=name
            )
    options = body.get("options")
    if options is None:
        options = {}
    allowed = OPTIONS_BY_KIND.get(account.kind, ())
    if not isinstance(options, dict) or (unknown := set(options) - set(allowed)):
        return error(
            400,
            "VALIDATION_ERROR",
            f"options for a {account.kind} account may only hold {', '.join(allowed) or 'nothing'}"
            + (f"; unknown: {', '.join(sorted(unknown))}." if isinstance(options, dict) else "."),
            field="options",
        )
    data: dict[str, Any] = {
        "provider_account": account.pk,
        "prompt": body.get("prompt") if isinstance(body.get("prompt"), str) else "",
        "timeout_seconds": body.get("timeout_seconds", settings.RUNBRAKE_DEFAULT_TIMEOUT_SECONDS),
        "no_progress_seconds": body.get(
            "no_progress_seconds", settings.RUNBRAKE_NO_PROGRESS_SECONDS
        ),
        "clear_queue": options.get("clear_queue", True),
    }
    for name, value in options.items():
        if name in JSON_FIELDS:
            data[name] = json.dumps(value)
        elif name != "clear_queue":
            data[name] = value
    return data


def _validated_form(data: dict[str, Any], account: ProviderAccount, username: str) -> LaunchForm:
    form = LaunchForm(data, team=account.team, username=username)
    form.is_valid()
    return form


@api_view("GET")
async def run_detail(request: HtmxHttpRequest, pk: int) -> JsonResponse:
    run = await _runs(request.user).filter(pk=pk).afirst()
    if run is None:
        return error(404, "NOT_FOUND", f"No run {pk} in your teams.")
    return JsonResponse(run_json(run))


def _body_with_reason(request: HtmxHttpRequest) -> tuple[dict[str, Any], str] | JsonResponse:
    """A stop's JSON body and its reason (a string, empty when not given), or the 400."""
    body = read_json(request)
    if isinstance(body, JsonResponse):
        return body
    reason = body.get("reason", "")
    if not isinstance(reason, str):
        return error(400, "VALIDATION_ERROR", "reason must be a string.", field="reason")
    return body, reason


@api_view("POST")
async def stop_many(request: HtmxHttpRequest) -> JsonResponse:
    """`{"ids": [...]}` or `{"filter": {"status", "team", "provider", "mine"}}` → one outcome
    per run: stopped, stopping, unconfirmed, already_finished, not_allowed, not_found, failed."""
    read = _body_with_reason(request)
    if isinstance(read, JsonResponse):
        return read
    body, reason = read
    if "ids" in body:
        ids = body["ids"]
        if (
            not isinstance(ids, list)
            or not ids
            or any(not isinstance(i, int) or as_id(i) is None for i in ids)
        ):
            return error(400, "VALIDATION_ERROR", "ids must be a list of run ids.", field="ids")
        if len(ids) > 1000:
            return error(400, "VALIDATION_ERROR", "At most 1000 ids at a time.", field="ids")
    elif isinstance(body.get("filter"), dict):
        chosen = body["filter"]
        runs = _runs(request.user).filter(status__in=(Status.PENDING, Status.RUNNING))
        if chosen.get("team") is not None:
            if (team_id := as_id(chosen["team"])) is None:
                return error(
                    400, "VALIDATION_ERROR", "filter.team must be a team id.", field="filter"
                )
            runs = runs.filter(team_id=team_id)
        if (provider := chosen.get("provider")) not in (None, ""):
            if provider not in ProviderKind.values:
                return error(
                    400, "VALIDATION_ERROR", "filter.provider is not a provider.", field="filter"
                )
            runs = runs.filter(provider=provider)
        if not isinstance(chosen.get("mine", False), bool):
            return error(
                400, "VALIDATION_ERROR", "filter.mine must be true or false.", field="filter"
            )
        if chosen.get("mine"):
            runs = runs.filter(created_by=request.user)
        ids = [pk async for pk in runs.values_list("pk", flat=True)[:1000]]
    else:
        return error(400, "VALIDATION_ERROR", "Send ids or a filter object.", field="ids")
    if limited := await ahit("stop", str(request.user.pk)):
        return too_many(limited)
    results = await astop_each(ids, user=request.user, channel=Channel.API, reason=reason)
    return JsonResponse(
        {
            "results": [
                {"id": r.id, "outcome": r.outcome, "status": r.status, "message": r.message}
                for r in results
            ]
        }
    )


@sync_to_async
def _request_stop(
    request: HtmxHttpRequest, pk: int
) -> JsonResponse | tuple[Run, ProviderAccount, bool]:
    """Everything before the provider call, in one thread hop: the token, the run and the
    membership, the rate limit, the body, and the stop intent, committed."""
    user = ApiToken.user_for(bearer_token(request))
    if user is None:
        return unauthenticated()
    request.user = user
    found = run_to_stop(user, pk)
    if found is None:
        return error(404, "NOT_FOUND", f"No run {pk} in your teams.")
    run, membership = found
    if not membership.can_stop(run):
        return error(403, "FORBIDDEN", membership.stop_refusal)
    if limited := hit("stop", str(user.pk)):
        return too_many(limited)
    read = _body_with_reason(request)
    if isinstance(read, JsonResponse):
        return read
    _, reason = read
    # Loaded with the run: the stop call needs no query of its own (request_stop's refresh
    # forgets it).
    account = run.provider_account
    try:
        requested = run.request_stop(actor=user, channel=Channel.API, reason=reason)
    except RunAlreadyFinished as exc:
        return error(409, "RUN_ALREADY_FINISHED", str(exc), run=run_json(_runs(user).get(pk=pk)))
    return run, account, requested


@api_view("POST", authenticates=True)
async def stop_run(request: HtmxHttpRequest, pk: int) -> JsonResponse:
    before = await _request_stop(request, pk)
    if isinstance(before, JsonResponse):
        return before
    run, account, requested = before
    await run.asend_requested_stop(requested, account)
    run = await _runs(request.user).aget(pk=pk)
    return JsonResponse(run_json(run))
