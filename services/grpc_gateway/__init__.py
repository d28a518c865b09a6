"""The grpc_gateway service.

gRPC's C core writes its own plain-text lines to stderr, which would break the
one-JSON-object-per-line log. It is silenced unless GRPC_VERBOSITY is set, so
an operator can still turn it on (GRPC_VERBOSITY=ERROR) while debugging.
"""

import os

os.environ.setdefault("GRPC_VERBOSITY", "NONE")
