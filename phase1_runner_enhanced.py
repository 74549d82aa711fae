#!/usr/bin/env python
"""Runbook Phases 2-3 command line (see `python phase1_runner_enhanced.py --help`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from esa.runbook import phase_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(phase_main())
