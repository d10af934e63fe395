"""``python -m shadowlab``."""

from shadowlab.cli.main import main

raise SystemExit(main())
