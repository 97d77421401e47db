"""The way in: the HTTP API, body reading and validation, the inbox drop zone."""
