"""``python -m shadowlab``."""

from .cli import main

raise SystemExit(main())
