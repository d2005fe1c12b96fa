import sys

from metasam.cli.main import main

sys.exit(main())
