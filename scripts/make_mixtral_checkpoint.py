#!/usr/bin/env python3
"""The old name of scripts/make_checkpoint.py (kept so that scripts calling it still work):
the same arguments, a Mixtral-shaped checkpoint by default.

    python scripts/make_mixtral_checkpoint.py OUT [--hidden 512 --intermediate 1792 --layers 4] [--dtype float32]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_checkpoint import main  # noqa: E402

if __name__ == "__main__":
    main()
