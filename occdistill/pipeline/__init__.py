"""End-to-end jobs composed from the library layers (the CLI stays a thin wrapper over these)."""
