"""The loopback sandbox for drills and tests: fake order centers, DNS and SMS gateway."""
