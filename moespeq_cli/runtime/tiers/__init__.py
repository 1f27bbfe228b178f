"""Where experts live: the disk tier (the checkpoint's files), host RAM and device slots,
each a cache of the one below (docs/design.md §9)."""
