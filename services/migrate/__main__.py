import sys

from services.migrate.main import main

sys.exit(main())
