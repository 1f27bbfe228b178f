"""Memory tiers below the device: the disk tier (``disk.py``), read without the page cache."""
