"""Routers of the dashboard's JSON API, one per resource."""
