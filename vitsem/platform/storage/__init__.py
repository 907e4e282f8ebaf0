"""Storage adapters (artifacts, metadata). They depend on the core, never the reverse."""
