import sys

from segquant_cli.main import main

sys.exit(main())
