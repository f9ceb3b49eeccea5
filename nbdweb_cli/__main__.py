import sys

from nbdweb_cli.main import main

sys.exit(main())
