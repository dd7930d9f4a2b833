import sys

from diffctl.cli import main

sys.exit(main())
