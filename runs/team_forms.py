"""Forms of the team pages: members (add, change role, team setting) and provider accounts."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

from django import forms
from django.contrib.auth import get_user_model

from .models import Membership, ProviderAccount, ProviderKind, Role, Team

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


class TeamSettingsForm(forms.ModelForm):
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


class ProviderAccountForm(forms.ModelForm):
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

    class Meta:
        model = ProviderAccount
        fields = ["kind", "name", "base_url"]
        labels = {"base_url": "Base URL"}
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
        # Validation writes the typed values onto the instance; the title keeps the old name.
        self.original_name = self.instance.name
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
            key.help_text = "Stored encrypted and never shown again: only its first and last "
            key.help_text += "four characters are displayed."

    @property
    def options_examples(self) -> list[tuple[str, str]]:
        """What each provider reads from the options, for the help under the field."""
        return [(ProviderKind(kind).label, example) for kind, example in OPTIONS_HELP.items()]

    def clean_name(self) -> str:
        name = self.cleaned_data["name"].strip()
        # The team is not a field of the form, so Django's own unique check cannot see it.
        clash = ProviderAccount.objects.filter(team=self.team, name=name)
        if self.editing:
            clash = clash.exclude(pk=self.instance.pk)
        if clash.exists():
            raise forms.ValidationError(f"{self.team.name} already has an account named {name}.")
        return name

    def clean_base_url(self) -> str:
        url = self.cleaned_data["base_url"].strip()
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

    def save(self, commit: bool = True) -> ProviderAccount:
        account = super().save(commit=False)
        account.team = self.team
        account.options = self.cleaned_data["options"]
        new_key = self.cleaned_data["api_key"]
        if new_key:
            account.api_key = new_key
        if commit:
            if self.editing and not new_key:
                # Leave the stored ciphertext alone: the key was not touched.
                account.save(update_fields=["kind", "name", "base_url", "options"])
            else:
                account.save()
        return account
