"""Scans on disk: a manifest, one memory-mapped .npy per site, and the stimuli beside them.

NumPy only: the store never imports mlx, so analyses can read scans without loading a model.
"""

from .scan_store import FORMAT, Scan, ScanWriter, open_scan

__all__ = ["FORMAT", "Scan", "ScanWriter", "open_scan"]
