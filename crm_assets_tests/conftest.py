"""Shared fixtures: the embedded CRMs on free ports (see embedded_fixtures)."""
