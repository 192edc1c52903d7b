"""``python -m zoodip_edge.many finish SPEC_JSON``: a job's report step, in its own process."""

import sys

from .finish import main

sys.exit(main(sys.argv[1:]))
