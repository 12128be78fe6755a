"""Simulator for dify (being written)."""

from django.urls import URLPattern

urlpatterns: list[URLPattern] = []
