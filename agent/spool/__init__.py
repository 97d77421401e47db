"""The one owner of pending/: record format, durable writes, claims, moves, drain."""
