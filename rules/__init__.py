"""Connection, envelope and content rules: each a small check in its own file."""
