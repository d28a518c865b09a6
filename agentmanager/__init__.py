"""Generated gRPC code of the Agent Manager protocol (scripts/gen-protos)."""
