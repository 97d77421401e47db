"""The one delivery layer: what an answer means and what to do next, pacing, backoff."""
