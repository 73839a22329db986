"""Thin transports: REST (jobs), streams (ws, sse) and health. None of them touches SQL."""
