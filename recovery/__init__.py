"""edge-recover: merge an offline buffer back into the order center."""
