"""The committed gRPC code in agentmanager/v1 matches what scripts/gen-protos makes."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support import PROJECT_ROOT

GENERATED = PROJECT_ROOT / "agentmanager"


def generated_files(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    subprocess.run([str(PROJECT_ROOT / "scripts" / "gen-protos"), str(tmp_path)], check=True, capture_output=True)

    fresh = generated_files(tmp_path / "agentmanager")
    # Hand-written modules may live beside the generated ones; only *_pb2* files must match the set.
    committed = {name: content for name, content in generated_files(GENERATED).items() if "_pb2" in name or name in fresh}

    assert sorted(fresh) == sorted(committed), "run scripts/gen-protos: the set of generated files differs"
    for name, content in fresh.items():
        assert committed[name] == content, f"agentmanager/{name} is stale: run scripts/gen-protos and commit"


def test_services_and_states_are_defined() -> None:
    from agentmanager.v1 import agent_pb2, common_pb2, panel_pb2

    assert agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name == "agentmanager.v1.AgentService"
    assert panel_pb2.DESCRIPTOR.services_by_name["PanelService"].full_name == "agentmanager.v1.PanelService"
    assert common_pb2.CommandState.Name(0) == "COMMAND_STATE_UNSPECIFIED"
    assert common_pb2.AgentStatus.Name(0) == "AGENT_STATUS_UNSPECIFIED"
    session = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].methods_by_name["Session"]
    assert session.client_streaming
    assert session.server_streaming
