"""``python -m agent``: the same commands as ``agentmgr-agent``; the launcher starts each version this way."""

import sys

from agent.cli import main

sys.exit(main())
