import sys

from saga.cli import main

sys.exit(main())
