"""End-to-end runtime runs on the device machine (probe.runtime)."""
