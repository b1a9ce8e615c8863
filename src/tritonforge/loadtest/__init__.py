"""Load tests, sweeps and tuning."""
