"""Forms of the team pages: members (add, change role, team setting) and provider accounts."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

from django import forms
from django.contrib.auth import get_user_model

from runs.models import (
    Membership,
    ProviderAccount,
    ProviderKind,
    QuotaTier,
    Role,
    Team,
)

ROLE_HELP = (
    "Viewers watch runs. Members launch runs and stop their own (and teammates', if the team "
    "allows it). Admins do everything, including members and provider accounts."
)


class AddMemberForm(forms.Form):
    username = forms.CharField(
        max_length=150,
        widget=forms.TextInput(
            attrs={"placeholder": "their Runbrake username", "autocomplete": "off"}
        ),
    )
    role = forms.ChoiceField(choices=Role.choices, initial=Role.MEMBER, help_text=ROLE_HELP)

    def __init__(self, *args: Any, team: Team, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.team = team

    def clean_username(self) -> Any:
        username = self.cleaned_data["username"].strip()
        User = get_user_model()
        user = User.objects.filter(**{User.USERNAME_FIELD: username}).first()
        if user is None:
            raise forms.ValidationError(
                f"There is no user named “{username}”. They need a Runbrake account before "
                "they can join a team."
            )
        existing = Membership.objects.filter(team=self.team, user=user).first()
        if existing is not None:
            raise forms.ValidationError(
                f"{username} is already a member of {self.team.name} "
                f"({existing.get_role_display().lower()})."
            )
        return user


class RoleForm(forms.Form):
    role = forms.ChoiceField(choices=Role.choices)


class TeamSettingsForm(forms.ModelForm[Team]):
    class Meta:
        model = Team
        fields = ["members_can_stop_others"]
        labels = {"members_can_stop_others": "Members may stop their teammates' runs"}
        help_texts = {
            "members_can_stop_others": "Off: members stop only the runs they launched; "
            "admins can still stop any run."
        }


# --- Provider accounts ------------------------------------------------------------------------

OPTIONS_HELP = {
    ProviderKind.FAY: '{"poll_interval": 2} — seconds between status reads.',
    ProviderKind.DIFY: '{"user": "runbrake", "max_execution_seconds": 1200} — the default '
    "end-user id; the app's APP_MAX_EXECUTION_TIME, if changed.",
    ProviderKind.INTELLIGENCEBOX: '{"box_address": "…"} — if it differs from the base URL.',
    ProviderKind.XPANDER: '{"agent_id": "…"} — the agent runs go to (required to launch).',
}


class ProviderAccountForm(forms.ModelForm[ProviderAccount]):
    # Not a model field of the form: the stored key is never put back into a page, so the
    # input is always empty and "empty" on an edit means "keep the key you have".
    api_key = forms.CharField(
        label="API key",
        required=False,
        max_length=2000,
        widget=forms.PasswordInput(
            render_value=False, attrs={"autocomplete": "new-password", "spellcheck": "false"}
        ),
    )
    options = forms.CharField(
        label="Options (JSON object)",
        required=False,
        widget=forms.Textarea(attrs={"rows": 3, "spellcheck": "false", "placeholder": "{}"}),
    )
    # Custom quota numbers, one per kind of call the provider counts (used with "Custom").
    quota_create = forms.IntegerField(label="Launches an hour", required=False, min_value=1)
    quota_status = forms.IntegerField(label="Status reads an hour", required=False, min_value=1)
    quota_output = forms.IntegerField(label="Output reads an hour", required=False, min_value=1)
    quota_stop = forms.IntegerField(label="Stop calls an hour", required=False, min_value=1)
    quota_month = forms.IntegerField(label="Calls a month", required=False, min_value=1)
    # Like the key: written once, never shown back; empty on an edit keeps it.
    webhook_secret = forms.CharField(
        label="Webhook secret",
        required=False,
        max_length=500,
        widget=forms.PasswordInput(
            render_value=False, attrs={"autocomplete": "new-password", "spellcheck": "false"}
        ),
        help_text="Fay shows it once when you register this account's webhook URL in its "
        "dashboard (Settings → Webhooks). With it, runs learn their end from Fay at once and "
        "status reads drop to a slow safety net.",
    )
    forget_webhook_secret = forms.BooleanField(
        label="Stop receiving webhooks (forget the secret)", required=False
    )

    QUOTA_FIELDS = ("quota_create", "quota_status", "quota_output", "quota_stop", "quota_month")

    class Meta:
        model = ProviderAccount
        fields = ["kind", "name", "base_url", "quota_tier"]
        labels = {"base_url": "Base URL", "quota_tier": "Plan at the provider"}
        help_texts = {
            "quota_tier": "The plan of this key at the provider. Runbrake paces its calls to "
            "fit it, queues launches and stops past it, and says so. Fay: free 10 launches, "
            "100 status reads and 20 stops an hour and 100 calls a month; pro ten times that "
            "(10,000 a month)."
        }
        widgets = {
            "base_url": forms.URLInput(
                attrs={"placeholder": "https://api.example.com/v1", "spellcheck": "false"}
            )
        }

    def __init__(self, *args: Any, team: Team, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.team = team
        self.editing = self.instance.pk is not None
        kind_field = self.fields["kind"]
        assert isinstance(kind_field, forms.ChoiceField)
        kind_field.choices = [("", "Choose…"), *ProviderKind.choices]
        # Validation writes the typed values onto the instance; the title keeps the old name
        # and the check below the URL the stored key belongs to.
        self.original_name = self.instance.name
        self.original_base_url = self.instance.base_url
        # Forms posted without the quota keep the account's (new accounts: no known quota).
        self.fields["quota_tier"].required = False
        if not self.is_bound and self.instance.quota_tier == QuotaTier.CUSTOM:
            for name in self.QUOTA_FIELDS:
                self.initial[name] = (self.instance.quota_limits or {}).get(name[6:])
        key = self.fields["api_key"]
        if self.editing:
            key.help_text = (
                f"Stored encrypted as {self.instance.masked_key}. Leave blank to keep it; "
                "type a new key to replace it."
            )
            key.widget.attrs["placeholder"] = "Leave blank to keep the current key"
            if not self.is_bound and self.instance.options:
                self.initial["options"] = json.dumps(self.instance.options, indent=2)
            # Runs keep the provider they were launched with; switching an account that has
            # runs to another provider would send their stops to the wrong API.
            if self.instance.runs.exists():
                kind_field.disabled = True
                kind_field.help_text = (
                    "This account has runs; add a new account for another provider."
                )
        else:
            key.help_text = "Stored encrypted and never shown again: only its last four "
            key.help_text += "characters are displayed."

    @property
    def options_examples(self) -> list[tuple[str, str]]:
        """What each provider reads from the options, for the help under the field."""
        return [(ProviderKind(kind).label, example) for kind, example in OPTIONS_HELP.items()]

    def clean_name(self) -> str:
        name: str = self.cleaned_data["name"].strip()
        # The team is not a field of the form, so Django's own unique check cannot see it.
        clash = ProviderAccount.objects.filter(team=self.team, name=name)
        if self.editing:
            clash = clash.exclude(pk=self.instance.pk)
        if clash.exists():
            raise forms.ValidationError(f"{self.team.name} already has an account named {name}.")
        return name

    def clean_base_url(self) -> str:
        url: str = self.cleaned_data["base_url"].strip()
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise forms.ValidationError(
                "The base URL must start with http:// or https:// and name a host."
            )
        return url

    def clean_options(self) -> dict[str, Any]:
        raw = self.cleaned_data.get("options") or ""
        if not raw.strip():
            return {}
        try:
            value = json.loads(raw)
        except ValueError as exc:
            raise forms.ValidationError(f"This is not valid JSON: {exc}.") from None
        if not isinstance(value, dict):
            raise forms.ValidationError('This must be a JSON object, like {"key": "value"}.')
        return value

    def clean_api_key(self) -> str:
        key = self.cleaned_data.get("api_key") or ""
        if not key and not self.editing:
            raise forms.ValidationError("The provider's API key is required.")
        return key

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        assert cleaned is not None
        base_url = cleaned.get("base_url")
        if (
            self.editing
            and base_url
            and base_url != self.original_base_url
            and not cleaned.get("api_key")
        ):
            # The stored key belongs to the old host: never send it anywhere else.
            self.add_error(
                "api_key",
                "The base URL changed, so type the key again: Runbrake never sends a stored "
                "key to a new address.",
            )
        if not cleaned.get("quota_tier"):
            cleaned["quota_tier"] = self.instance.quota_tier or QuotaTier.UNLIMITED
            self.instance.quota_tier = cleaned["quota_tier"]
        limits = {
            name[6:]: cleaned[name] for name in self.QUOTA_FIELDS if cleaned.get(name) is not None
        }
        if cleaned.get("quota_tier") == QuotaTier.CUSTOM and not limits:
            self.add_error("quota_tier", "Enter at least one number for a custom quota.")
        kind = cleaned.get("kind")
        tier = cleaned.get("quota_tier")
        if tier in (QuotaTier.FREE, QuotaTier.PRO) and kind and kind != ProviderKind.FAY:
            self.add_error(
                "quota_tier",
                "Only Fay documents free and pro quotas; use Custom numbers for this provider.",
            )
        cleaned["quota_limits"] = limits if cleaned.get("quota_tier") == QuotaTier.CUSTOM else {}
        if cleaned.get("webhook_secret") and kind and kind != ProviderKind.FAY:
            self.add_error("webhook_secret", "Only Fay sends webhooks.")
        return cleaned

    def save(self, commit: bool = True) -> ProviderAccount:
        account = super().save(commit=False)
        account.team = self.team
        account.options = self.cleaned_data["options"]
        account.quota_limits = self.cleaned_data["quota_limits"]
        new_key = self.cleaned_data["api_key"]
        if new_key:
            account.api_key = new_key
        fields = ["kind", "name", "base_url", "options", "quota_tier", "quota_limits"]
        if self.cleaned_data.get("forget_webhook_secret"):
            account.webhook_secret = ""
            fields.append("webhook_secret")
        elif self.cleaned_data.get("webhook_secret"):
            account.webhook_secret = self.cleaned_data["webhook_secret"]
            fields.append("webhook_secret")
        if commit:
            if self.editing and not new_key:
                # Leave the stored key's ciphertext alone: the key was not touched.
                account.save(update_fields=fields)
            else:
                account.save()
        return account
