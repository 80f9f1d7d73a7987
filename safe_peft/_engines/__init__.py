"""Serving engines: the rule data per engine, the check, the conversion for an engine and their CLI."""
