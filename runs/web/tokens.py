"""A user's API tokens: create one (named, optionally expiring; shown once), see when each was
last used, revoke one. Only the owner sees or touches their tokens; another's is a 404."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django import forms
from django.contrib.auth.decorators import login_required
from django.http import HttpResponseBase
from django.shortcuts import get_object_or_404, render
from django.utils import timezone
from django.views.decorators.http import require_http_methods

from runs.models import ApiToken
from runs.security.hostile import as_id, text_problem
from runs.web.answers import HtmxHttpRequest, toast

EXPIRY_CHOICES = [
    ("", "Never"),
    ("7", "In 7 days"),
    ("30", "In 30 days"),
    ("90", "In 90 days"),
    ("365", "In a year"),
]


class TokenForm(forms.Form):
    name = forms.CharField(
        max_length=100,
        required=False,
        label="What it is for",
        widget=forms.TextInput(attrs={"placeholder": "e.g. nightly report script"}),
    )
    expires = forms.ChoiceField(choices=EXPIRY_CHOICES, required=False, label="Expires")

    def clean_name(self) -> str:
        name: str = self.cleaned_data.get("name") or ""
        if problem := text_problem(name):
            raise forms.ValidationError(f"The name {problem}.")
        return name.strip()


@require_http_methods(["GET", "POST"])
@login_required
def tokens(request: HtmxHttpRequest) -> HttpResponseBase:
    context: dict[str, Any] = {"form": TokenForm(), "section": "tokens"}
    if request.method == "POST":
        action = request.POST.get("action")
        if action == "revoke":
            token = get_object_or_404(
                ApiToken.objects.filter(user=request.user), pk=as_id(request.POST.get("token")) or 0
            )
            token.delete()
            context["message"] = f"Revoked {token.name or token.prefix + '…'}: it works no more."
        elif action == "create":
            form = TokenForm(request.POST)
            if form.is_valid():
                days = form.cleaned_data.get("expires")
                expires = timezone.now() + dt.timedelta(days=int(days)) if days else None
                context["new_token"] = ApiToken.issue(
                    request.user, name=form.cleaned_data["name"], expires_at=expires
                )
                context["message"] = "Token created. Copy it now: it is shown only this once."
            else:
                context["form"] = form
    context["tokens"] = list(ApiToken.objects.filter(user=request.user))
    template = "runs/tokens.html#tokens-panel" if request.htmx else "runs/tokens.html"
    response = render(request, template, context)
    if context.get("message"):
        toast(response, context["message"], "success")
    return response
