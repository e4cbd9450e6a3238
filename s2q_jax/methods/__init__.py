"""Calibration methods beyond round-to-nearest."""
