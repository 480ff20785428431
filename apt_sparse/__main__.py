import sys

from apt_sparse.cli import main

sys.exit(main())
