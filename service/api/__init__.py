"""Transports: thin leaves that parse, call ``SessionService``, and reply."""
