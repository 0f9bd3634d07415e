"""The millpond pooling proxy: a PgBouncer-compatible PostgreSQL front end."""
