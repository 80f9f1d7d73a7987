"""``python -m safe_peft``: the same as the ``safe-peft`` command."""

from safe_peft._cli import main

raise SystemExit(main())
