import sys

from services.grpc_gateway.main import main

sys.exit(main())
