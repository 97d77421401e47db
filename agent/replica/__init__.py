"""The offline buffer replicated through NATS JetStream (CONTRACT 11)."""
