"""`python -m nla <stage> ...`: the same entry point as the `nla` console script."""

from nla.cli import main

raise SystemExit(main())
