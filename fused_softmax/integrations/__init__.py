"""Integrations with other libraries. Each module imports its library, so import only the one you use."""
