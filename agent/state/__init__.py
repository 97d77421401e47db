"""SQLite state: the dedupe journal, the serial high-water mark, group commit."""
