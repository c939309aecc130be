"""Developer and deployment tools (run from the repository root)."""
