"""The Litestar service (``create_app``) lives here; see the service issue for its scope."""
