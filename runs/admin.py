from __future__ import annotations

from django import forms
from django.contrib import admin
from django.utils.html import format_html

from .models import ApiToken, Membership, ProviderAccount, Run, RunEvent, Team


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 1
    autocomplete_fields = ["user"]


@admin.register(Team)
class TeamAdmin(admin.ModelAdmin):
    list_display = ["name", "created_at"]
    search_fields = ["name"]
    inlines = [MembershipInline]


class ProviderAccountForm(forms.ModelForm):
    # The key is write-only: blank keeps the stored one, and the stored one is never sent back.
    api_key = forms.CharField(
        required=False,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text="Stored encrypted. Leave blank to keep the current key.",
    )

    class Meta:
        model = ProviderAccount
        fields = ["team", "kind", "name", "base_url", "api_key", "options"]

    def clean_api_key(self) -> str:
        key = self.cleaned_data.get("api_key") or ""
        if not key and not self.instance.pk:
            raise forms.ValidationError("An API key is required for a new account.")
        return key or self.instance.api_key


@admin.register(ProviderAccount)
class ProviderAccountAdmin(admin.ModelAdmin):
    form = ProviderAccountForm
    list_display = ["name", "team", "kind", "base_url", "masked_key"]
    list_filter = ["kind", "team"]
    search_fields = ["name", "base_url"]

    @admin.display(description="API key")
    def masked_key(self, obj: ProviderAccount) -> str:
        return obj.masked_key


class RunEventInline(admin.TabularInline):
    model = RunEvent
    extra = 0
    can_delete = False
    fields = readonly_fields = (
        "at",
        "kind",
        "from_status",
        "to_status",
        "actor",
        "channel",
        "message",
        "data",
    )

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Run)
class RunAdmin(admin.ModelAdmin):
    list_display = [
        "id",
        "status_badge",
        "team",
        "provider",
        "short_prompt",
        "created_by",
        "created_at",
        "stop_latency",
    ]
    list_filter = ["status", "provider", "team", "stop_channel", "created_at"]
    search_fields = ["prompt", "external_id", "created_by__username"]
    date_hierarchy = "created_at"
    list_select_related = ["team", "created_by"]
    inlines = [RunEventInline]
    # Status only changes through the state machine, never by editing a form.
    readonly_fields = [f.name for f in Run._meta.concrete_fields]

    def has_add_permission(self, request) -> bool:
        return False

    @admin.display(description="Status", ordering="status")
    def status_badge(self, obj: Run) -> str:
        return format_html(
            '<strong class="badge-{}">{}</strong>', obj.status, obj.get_status_display()
        )

    @admin.display(description="Prompt")
    def short_prompt(self, obj: Run) -> str:
        return obj.prompt[:80]

    @admin.display(description="Stop latency")
    def stop_latency(self, obj: Run) -> str:
        return f"{obj.stop_latency_ms} ms" if obj.stop_latency_ms is not None else "—"


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["prefix", "user", "created_at", "last_used_at"]
    readonly_fields = ["prefix", "digest", "created_at", "last_used_at"]
    search_fields = ["user__username", "prefix"]
