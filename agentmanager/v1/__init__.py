"""Generated from protos/agentmanager/v1 by scripts/gen-protos; do not edit."""
