"""SMS notices: the persistent outbox, providers, phone rules."""
