"""Format plumbing with no model knowledge."""
