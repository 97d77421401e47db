"""Outage drills: the real agent against a loopback sandbox, scenario by scenario."""
