import sys

from services.updater.main import main

sys.exit(main())
