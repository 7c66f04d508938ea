import sys

from mailsys.cli import main

sys.exit(main())
