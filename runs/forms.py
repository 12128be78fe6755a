from __future__ import annotations

import json
from typing import Any

import jsonschema
from django import forms
from django.conf import settings

from .models import ProviderAccount, Team

MAX_PROMPT = 20_000


class AccountChoiceField(forms.ModelChoiceField):
    def label_from_instance(self, obj: ProviderAccount) -> str:
        return obj.name


class LaunchForm(forms.Form):
    provider_account = AccountChoiceField(queryset=ProviderAccount.objects.none(), empty_label=None)
    prompt = forms.CharField(
        max_length=MAX_PROMPT,
        widget=forms.Textarea(
            attrs={"rows": 4, "placeholder": "What should the provider research or answer?"}
        ),
    )
    structured_output = forms.BooleanField(
        required=False,
        label="Structured output (Fay)",
        help_text="Ask Fay for a JSON object shaped by the schema below instead of Markdown.",
    )
    output_schema = forms.CharField(
        required=False,
        label="Output JSON schema",
        widget=forms.Textarea(
            attrs={"rows": 4, "placeholder": '{"type": "object", "properties": {…}}'}
        ),
    )
    timeout_seconds = forms.IntegerField(
        min_value=10,
        max_value=24 * 3600,
        label="Timeout (seconds)",
        help_text="Runbrake stops the run for you after this long.",
    )

    def __init__(self, *args: Any, team: Team, **kwargs: Any) -> None:
        kwargs.setdefault("initial", {}).setdefault(
            "timeout_seconds", settings.RUNBRAKE_DEFAULT_TIMEOUT_SECONDS
        )
        super().__init__(*args, **kwargs)
        field = self.fields["provider_account"]
        assert isinstance(field, forms.ModelChoiceField)
        field.queryset = ProviderAccount.objects.filter(team=team)
        if not self.is_bound and (first := field.queryset.first()):
            self.initial.setdefault("provider_account", first.pk)

    def clean_output_schema(self) -> dict[str, Any] | None:
        raw = self.cleaned_data.get("output_schema")
        if raw in (None, ""):
            return None
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except ValueError as exc:
                raise forms.ValidationError(f"This is not valid JSON: {exc}.") from None
        if not isinstance(raw, dict):
            raise forms.ValidationError("The schema must be a JSON object.")
        try:
            jsonschema.validators.validator_for(raw).check_schema(raw)
        except jsonschema.SchemaError as exc:
            raise forms.ValidationError(f"This is not a valid JSON Schema: {exc.message}") from None
        return raw

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if data.get("structured_output") and not data.get("output_schema"):
            self.add_error("output_schema", "Structured output needs a JSON schema.")
        if data.get("output_schema") and not data.get("structured_output"):
            self.add_error("structured_output", "Tick this to use the schema, or clear the schema.")
        return data

    def run_options(self) -> dict[str, Any]:
        if self.cleaned_data.get("structured_output"):
            return {
                "structured_output": True,
                "output_schema": self.cleaned_data["output_schema"],
            }
        return {}
