"""A chain step's states (CONTRACT 10). "overdue" is never stored: it is pending past the
deadline, worked out when shown."""

PENDING, VERIFIED, FAILED, OVERDUE = "pending", "verified", "failed", "overdue"
STATES = (VERIFIED, PENDING, FAILED, OVERDUE)
