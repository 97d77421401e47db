"""Full-chain verification of outage orders in the systems after the center (CONTRACT 10)."""
