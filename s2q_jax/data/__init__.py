"""Data for the embedded model: procedural videos and GIF output."""
