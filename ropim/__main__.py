import sys

from ropim.cli import main

sys.exit(main())
