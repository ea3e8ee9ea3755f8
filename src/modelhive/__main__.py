import sys

from modelhive.cli.main import main

sys.exit(main())
