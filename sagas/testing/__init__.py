"""The test kit: injected faults (`Fault` rows) for tests and drills, installed in test settings."""
