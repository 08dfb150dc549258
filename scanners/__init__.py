"""Anti-virus engine adapters behind one interface."""
