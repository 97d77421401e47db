"""Running the agent: start/stop of everything, reload, systemd, metrics."""
