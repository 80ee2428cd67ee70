"""Integrations with other libraries, each imported lazily by ``adacache_fx``."""
