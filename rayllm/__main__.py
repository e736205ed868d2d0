import sys

from rayllm.cli import main

sys.exit(main())
