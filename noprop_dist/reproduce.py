"""Entry point: ``python -m noprop_dist.reproduce ...``, the Table 1 harness (:mod:`noprop_dist.paper.harness`)."""
import sys

from .paper.harness import main

if __name__ == "__main__":
    sys.exit(main())
