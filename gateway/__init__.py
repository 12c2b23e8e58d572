"""The gateway: HTTP routes, request validation and preprocessing, settings, the CLI."""
