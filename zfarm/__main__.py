import sys

from zfarm.cli import main

sys.exit(main())
