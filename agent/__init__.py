"""The endpoint agent ``agentmgr-agent``: enrolls a host and runs the manager's commands on it.

The agent runs on monitored hosts without the manager's server side, so it
imports only the generated protocol code (``agentmanager``) and the libraries
pinned in setup.cfg, never ``services``.
"""

__version__ = "0.1.0"
