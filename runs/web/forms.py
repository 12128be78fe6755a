from __future__ import annotations

import json
import re
import uuid
from typing import Any
from urllib.parse import urlencode

import jsonschema
from django import forms
from django.conf import settings

from runs.models import ProviderAccount, ProviderKind, Run, Status, Team
from runs.security.hostile import MAX_DEPTH, as_id, json_problem, text_problem

MAX_PROMPT = 20_000

# Which launch options each provider takes; the form shows only the selected provider's.
OPTIONS_BY_KIND: dict[str, tuple[str, ...]] = {
    ProviderKind.FAY: ("structured_output", "output_schema"),
    ProviderKind.DIFY: ("user", "inputs"),
    ProviderKind.INTELLIGENCEBOX: ("messages",),
    ProviderKind.XPANDER: ("agent_id", "clear_queue"),
}
JSON_FIELDS = ("output_schema", "inputs", "messages")


# What an xpander agent id looks like (UUIDs and slugs): one URL path segment, never "..".
AGENT_ID = re.compile(r"(?!\.{1,2}$)[A-Za-z0-9._-]{1,200}")


class AccountChoiceField(forms.ModelChoiceField[ProviderAccount]):
    def label_from_instance(self, obj: ProviderAccount) -> str:
        return obj.name


def _json_text(placeholder: str) -> forms.Textarea:
    return forms.Textarea(attrs={"rows": 3, "placeholder": placeholder, "spellcheck": "false"})


class LaunchForm(forms.Form):
    provider_account = AccountChoiceField(queryset=ProviderAccount.objects.none(), empty_label=None)
    # No max_length on the field: its `maxlength` attribute would make the browser cut a
    # pasted prompt silently (losing its end); the limit is checked, and named, instead.
    prompt = forms.CharField(
        widget=forms.Textarea(
            attrs={
                "rows": 4,
                "placeholder": "What should the provider research or answer?",
                "data-limit": str(MAX_PROMPT),
                "aria-describedby": "prompt-count",
            }
        ),
    )
    timeout_seconds = forms.IntegerField(
        min_value=10,
        max_value=24 * 3600,
        label="Timeout (seconds)",
        help_text="Runbrake stops the run for you after this long.",
    )
    no_progress_seconds = forms.IntegerField(
        required=False,
        min_value=0,
        max_value=24 * 3600,
        label="No-progress stop (seconds)",
        help_text="Stops a run that shows no new output or status this long. 0 = never.",
    )
    # Fay
    structured_output = forms.BooleanField(
        required=False,
        label="Structured output",
        help_text="Ask Fay for a JSON object shaped by the schema below instead of Markdown.",
    )
    output_schema = forms.CharField(
        required=False,
        label="Output JSON schema",
        widget=_json_text('{"type": "object", "properties": {…}}'),
    )
    # Dify
    user = forms.CharField(
        required=False,
        max_length=200,
        label="Dify end-user id",
        help_text="Scopes the conversation and the stop; defaults to your username.",
    )
    inputs = forms.CharField(
        required=False,
        label="Dify inputs (JSON object)",
        widget=_json_text('{"language": "en"}'),
    )
    # IntelligenceBox
    messages = forms.CharField(
        required=False,
        label="Earlier messages (JSON list)",
        help_text="Conversation so far, oldest first; the prompt is sent as the next user message.",
        widget=_json_text(
            '[{"role": "user", "content": "…"}, {"role": "assistant", "content": "…"}]'
        ),
    )
    # xpander
    agent_id = forms.CharField(required=False, max_length=200, label="xpander agent id")
    clear_queue = forms.BooleanField(
        required=False,
        initial=True,
        label="Clear the queue on stop",
        help_text="Cancelling also drops queued follow-up messages, so no surprise turn starts.",
    )

    # A fresh key per rendered form: a double-clicked or retried submit launches one run.
    idempotency_key = forms.CharField(required=False, max_length=200, widget=forms.HiddenInput)

    def __init__(self, *args: Any, team: Team, username: str = "", **kwargs: Any) -> None:
        initial = kwargs.setdefault("initial", {})
        initial.setdefault("timeout_seconds", settings.RUNBRAKE_DEFAULT_TIMEOUT_SECONDS)
        initial.setdefault("no_progress_seconds", settings.RUNBRAKE_NO_PROGRESS_SECONDS)
        initial.setdefault("idempotency_key", str(uuid.uuid4()))
        super().__init__(*args, **kwargs)
        self.username = username
        field = self.fields["provider_account"]
        assert isinstance(field, forms.ModelChoiceField)
        # The form never shows a key: deferring it saves a decryption per account per page
        # (the launch reads the chosen account's key when it sends the run).
        field.queryset = ProviderAccount.objects.filter(team=team).defer("api_key")
        self.accounts = {a.pk: a for a in field.queryset}
        if not self.is_bound and self.accounts:
            self.initial.setdefault("provider_account", next(iter(self.accounts)))
        self.fields["user"].widget.attrs["placeholder"] = username or "runbrake"
        xpander = next((a for a in self.accounts.values() if a.kind == ProviderKind.XPANDER), None)
        if xpander and not self.is_bound:
            self.initial.setdefault("agent_id", (xpander.options or {}).get("agent_id", ""))

    # --- What the template needs to show one provider's options at a time -----------------

    @property
    def account_kinds_json(self) -> str:
        return json.dumps({str(pk): a.kind for pk, a in self.accounts.items()})

    @property
    def selected_kind(self) -> str:
        account = self.accounts.get(as_id(self["provider_account"].value()) or 0)
        return account.kind if account else ""

    # --- Validation -------------------------------------------------------------------------

    def _json[T](self, name: str, kind: type[T]) -> T | None:
        raw = self.cleaned_data.get(name)
        account = self.cleaned_data.get("provider_account")
        # Only the chosen provider's options count: a leftover in a hidden section of another
        # provider must not block the launch with an error the user cannot see.
        if raw in (None, "") or account is None or name not in OPTIONS_BY_KIND[account.kind]:
            return None
        try:
            value = json.loads(raw)
        except ValueError as exc:
            raise forms.ValidationError(f"This is not valid JSON: {exc}.") from None
        except RecursionError:
            raise forms.ValidationError(
                f"This is nested too deeply ({MAX_DEPTH} levels at most)."
            ) from None
        if problem := json_problem(value):
            raise forms.ValidationError(f"This {problem}.")
        if not isinstance(value, kind):
            raise forms.ValidationError(
                f"This must be a JSON {'object' if kind is dict else 'list'}."
            )
        return value

    def clean_no_progress_seconds(self) -> int:
        value = self.cleaned_data.get("no_progress_seconds")
        return settings.RUNBRAKE_NO_PROGRESS_SECONDS if value is None else value

    def clean_output_schema(self) -> dict[str, Any] | None:
        schema = self._json("output_schema", dict)
        if schema is not None:
            try:
                jsonschema.validators.validator_for(schema).check_schema(schema)
            except jsonschema.SchemaError as exc:
                raise forms.ValidationError(
                    f"This is not a valid JSON Schema: {exc.message}"
                ) from None
        return schema

    def clean_inputs(self) -> dict[str, Any] | None:
        return self._json("inputs", dict)

    def clean_messages(self) -> list[dict[str, str]] | None:
        messages = self._json("messages", list)
        for i, message in enumerate(messages or [], start=1):
            if (
                not isinstance(message, dict)
                or message.get("role") not in ("user", "assistant", "system")
                or not isinstance(message.get("content"), str)
            ):
                raise forms.ValidationError(
                    f"Message {i} needs a role (user, assistant or system) and a text content."
                )
        return messages

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        account = data.get("provider_account")
        kind = account.kind if account else ""
        if kind == ProviderKind.FAY:
            if (
                data.get("structured_output")
                and not data.get("output_schema")
                and "output_schema" not in self.errors
            ):
                self.add_error("output_schema", "Structured output needs a JSON schema.")
            if data.get("output_schema") and not data.get("structured_output"):
                self.add_error(
                    "structured_output", "Tick this to use the schema, or clear the schema."
                )
        if (
            account is not None
            and kind == ProviderKind.XPANDER
            and not (data.get("agent_id") or (account.options or {}).get("agent_id"))
        ):
            self.add_error("agent_id", "An xpander run needs the id of the agent to run.")
        agent = data.get("agent_id") or ""
        if agent and not AGENT_ID.fullmatch(agent):
            # It becomes a segment of the provider's URL path: no "/", "..", spaces or controls.
            self.add_error(
                "agent_id",
                "An agent id is letters, digits, '-', '_' and '.', as xpander shows it.",
            )
        return data

    @property
    def prompt_limit(self) -> str:
        return f"{MAX_PROMPT:,}"

    def clean_prompt(self) -> str:
        prompt: str = self.cleaned_data["prompt"]
        if problem := text_problem(prompt):
            raise forms.ValidationError(f"The prompt {problem}; remove it and launch again.")
        if len(prompt) > MAX_PROMPT:
            raise forms.ValidationError(
                f"The prompt is {len(prompt):,} characters; the limit is {MAX_PROMPT:,}. "
                "Shorten it: nothing was launched, and nothing of it was cut."
            )
        return prompt

    def launch(self, user: Any, *, channel: str, idempotency_key: str = "") -> Run:
        """Launch the run this valid form describes (the page and the API alike). Raises
        IdempotencyConflict for a key already used with other settings."""
        data = self.cleaned_data
        return Run.objects.launch(
            account=data["provider_account"],
            user=user,
            prompt=data["prompt"],
            options=self.run_options(),
            timeout_seconds=data["timeout_seconds"],
            no_progress_seconds=data["no_progress_seconds"],
            channel=channel,
            idempotency_key=idempotency_key,
        )

    def run_options(self) -> dict[str, Any]:
        data = self.cleaned_data
        kind = data["provider_account"].kind
        if kind == ProviderKind.FAY:
            if data.get("structured_output"):
                return {"structured_output": True, "output_schema": data["output_schema"]}
            return {}
        if kind == ProviderKind.DIFY:
            return {
                "user": data.get("user") or self.username or "runbrake",
                "inputs": data.get("inputs") or {},
            }
        if kind == ProviderKind.INTELLIGENCEBOX:
            return {"messages": data.get("messages") or []} if data.get("messages") else {}
        if kind == ProviderKind.XPANDER:
            account = data["provider_account"]
            return {
                "agent_id": data.get("agent_id") or (account.options or {}).get("agent_id"),
                "clear_queue": bool(data.get("clear_queue")),
            }
        return {}


class RunFilterForm(forms.Form):
    """The shared run list's filters. They live in the URL, so a link shows a teammate the
    same list, and the websocket applies the same test to every push."""

    status = forms.MultipleChoiceField(choices=Status.choices, required=False)
    provider = forms.ChoiceField(
        choices=[("", "Any provider"), *ProviderKind.choices],
        required=False,
        # The page's <label for="f-provider"> names it (the other filters are plain inputs).
        widget=forms.Select(attrs={"id": "f-provider"}),
    )
    owner = forms.CharField(required=False, max_length=150, label="Owner")
    q = forms.CharField(required=False, max_length=200, label="Prompt contains")
    reason = forms.CharField(required=False, max_length=200, label="Stop reason contains")

    def __init__(self, data: Any, *, team: Team, user: Any) -> None:
        super().__init__(data)
        self.team = team
        self.user = user
        self.owner_id: int | None = None
        self.is_valid()

    def clean_owner(self) -> str:
        owner = (self.cleaned_data.get("owner") or "").strip()
        if not owner:
            return ""
        if owner == "me":
            self.owner_id = self.user.pk
            return owner
        member = self.team.memberships.filter(user__username=owner).values_list(
            "user_id", flat=True
        )
        self.owner_id = member.first()
        if self.owner_id is None:
            raise forms.ValidationError(f"No member named {owner!r} in this team.")
        return owner

    def value(self, name: str) -> Any:
        return self.cleaned_data.get(name) if hasattr(self, "cleaned_data") else None

    @property
    def active(self) -> bool:
        return any(self.value(name) for name in self.fields)

    def apply(self, runs: Any, *, with_status: bool = True) -> Any:
        if with_status and (statuses := self.value("status")):
            runs = runs.filter(status__in=statuses)
        if provider := self.value("provider"):
            runs = runs.filter(provider=provider)
        if self.value("owner"):
            runs = runs.filter(created_by_id=self.owner_id or 0)
        elif self.errors.get("owner"):
            runs = runs.none()
        if q := self.value("q"):
            runs = runs.filter(prompt__icontains=q)
        if reason := self.value("reason"):
            runs = runs.filter(stop_reason__icontains=reason)
        return runs

    def list_page(self, before: str | None) -> dict[str, Any]:
        """The page of the team's runs this filter selects, before the cursor `before`: what
        the list template and its socket's snapshot render."""
        cursor = as_id(before)
        runs, next_cursor = (
            self.apply(Run.objects.for_team(self.team))
            .listed()
            .page_before(cursor, settings.RUNBRAKE_RUNS_PER_PAGE)
        )
        return {
            "runs": runs,
            "next_cursor": next_cursor,
            # Only the newest page takes live insertions of new runs.
            "rows_id": "run-rows" if cursor is None else "run-rows-older",
            "cursor": cursor,
        }

    def matches(self, meta: dict[str, Any]) -> bool:
        """The same test as `apply`, on a pushed run's facts (no database round trip)."""
        if (statuses := self.value("status")) and meta["status"] not in statuses:
            return False
        if (provider := self.value("provider")) and meta["provider"] != provider:
            return False
        if self.value("owner") and meta["created_by_id"] != self.owner_id:
            return False
        if (q := self.value("q")) and q.lower() not in meta["prompt"].lower():
            return False
        return not (
            (reason := self.value("reason")) and reason.lower() not in meta["stop_reason"].lower()
        )

    def querystring(self) -> str:
        pairs = [
            (name, v)
            for name in self.fields
            for v in (self.value(name) if name == "status" else [self.value(name)]) or []
            if v
        ]
        return urlencode(pairs)
