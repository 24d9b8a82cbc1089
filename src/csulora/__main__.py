import sys

from csulora.cli import main

sys.exit(main())
