import datetime

from agentmanager.v1 import common_pb2 as _common_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UpdateState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UPDATE_STATE_UNSPECIFIED: _ClassVar[UpdateState]
    UPDATE_STATE_DOWNLOADING: _ClassVar[UpdateState]
    UPDATE_STATE_INSTALLING: _ClassVar[UpdateState]
    UPDATE_STATE_SUCCEEDED: _ClassVar[UpdateState]
    UPDATE_STATE_FAILED: _ClassVar[UpdateState]
    UPDATE_STATE_ROLLED_BACK: _ClassVar[UpdateState]
UPDATE_STATE_UNSPECIFIED: UpdateState
UPDATE_STATE_DOWNLOADING: UpdateState
UPDATE_STATE_INSTALLING: UpdateState
UPDATE_STATE_SUCCEEDED: UpdateState
UPDATE_STATE_FAILED: UpdateState
UPDATE_STATE_ROLLED_BACK: UpdateState

class RegisterRequest(_message.Message):
    __slots__ = ("enrollment_token", "facts", "replace")
    ENROLLMENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    enrollment_token: str
    facts: _common_pb2.HostFacts
    replace: bool
    def __init__(self, enrollment_token: _Optional[str] = ..., facts: _Optional[_Union[_common_pb2.HostFacts, _Mapping]] = ..., replace: _Optional[bool] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("agent_id", "agent_key", "settings", "group", "labels", "trusted_publisher_keys")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_KEY_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TRUSTED_PUBLISHER_KEYS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    agent_key: str
    settings: _common_pb2.SessionSettings
    group: str
    labels: _containers.ScalarMap[str, str]
    trusted_publisher_keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, agent_id: _Optional[str] = ..., agent_key: _Optional[str] = ..., settings: _Optional[_Union[_common_pb2.SessionSettings, _Mapping]] = ..., group: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., trusted_publisher_keys: _Optional[_Iterable[str]] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("hello", "heartbeat", "command_ack", "command_result", "update_status")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    COMMAND_ACK_FIELD_NUMBER: _ClassVar[int]
    COMMAND_RESULT_FIELD_NUMBER: _ClassVar[int]
    UPDATE_STATUS_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    heartbeat: Heartbeat
    command_ack: CommandAck
    command_result: CommandResult
    update_status: UpdateStatus
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., command_ack: _Optional[_Union[CommandAck, _Mapping]] = ..., command_result: _Optional[_Union[CommandResult, _Mapping]] = ..., update_status: _Optional[_Union[UpdateStatus, _Mapping]] = ...) -> None: ...

class ServerMessage(_message.Message):
    __slots__ = ("settings", "command_request", "update_notice", "result_stored", "cancel_command")
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    COMMAND_REQUEST_FIELD_NUMBER: _ClassVar[int]
    UPDATE_NOTICE_FIELD_NUMBER: _ClassVar[int]
    RESULT_STORED_FIELD_NUMBER: _ClassVar[int]
    CANCEL_COMMAND_FIELD_NUMBER: _ClassVar[int]
    settings: _common_pb2.SessionSettings
    command_request: CommandRequest
    update_notice: UpdateNotice
    result_stored: ResultStored
    cancel_command: CancelCommand
    def __init__(self, settings: _Optional[_Union[_common_pb2.SessionSettings, _Mapping]] = ..., command_request: _Optional[_Union[CommandRequest, _Mapping]] = ..., update_notice: _Optional[_Union[UpdateNotice, _Mapping]] = ..., result_stored: _Optional[_Union[ResultStored, _Mapping]] = ..., cancel_command: _Optional[_Union[CancelCommand, _Mapping]] = ...) -> None: ...

class CancelCommand(_message.Message):
    __slots__ = ("command_id",)
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    def __init__(self, command_id: _Optional[str] = ...) -> None: ...

class ResultStored(_message.Message):
    __slots__ = ("command_id",)
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    def __init__(self, command_id: _Optional[str] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("agent_version", "facts")
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    FACTS_FIELD_NUMBER: _ClassVar[int]
    agent_version: str
    facts: _common_pb2.HostFacts
    def __init__(self, agent_version: _Optional[str] = ..., facts: _Optional[_Union[_common_pb2.HostFacts, _Mapping]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("sent_at", "running_commands")
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    RUNNING_COMMANDS_FIELD_NUMBER: _ClassVar[int]
    sent_at: _timestamp_pb2.Timestamp
    running_commands: int
    def __init__(self, sent_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., running_commands: _Optional[int] = ...) -> None: ...

class CommandRequest(_message.Message):
    __slots__ = ("command_id", "command_line", "timeout", "expires_at")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    COMMAND_LINE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    command_line: str
    timeout: _duration_pb2.Duration
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, command_id: _Optional[str] = ..., command_line: _Optional[str] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CommandAck(_message.Message):
    __slots__ = ("command_id", "started_at")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    started_at: _timestamp_pb2.Timestamp
    def __init__(self, command_id: _Optional[str] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CommandResult(_message.Message):
    __slots__ = ("command_id", "exit_code", "stdout", "stderr", "stdout_truncated", "stderr_truncated", "duration", "timed_out", "error")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    STDOUT_FIELD_NUMBER: _ClassVar[int]
    STDERR_FIELD_NUMBER: _ClassVar[int]
    STDOUT_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    STDERR_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    exit_code: int
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    duration: _duration_pb2.Duration
    timed_out: bool
    error: str
    def __init__(self, command_id: _Optional[str] = ..., exit_code: _Optional[int] = ..., stdout: _Optional[bytes] = ..., stderr: _Optional[bytes] = ..., stdout_truncated: _Optional[bool] = ..., stderr_truncated: _Optional[bool] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., timed_out: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class UpdateStatus(_message.Message):
    __slots__ = ("rollout_id", "release_id", "state", "agent_version", "reason")
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    RELEASE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    rollout_id: str
    release_id: str
    state: UpdateState
    agent_version: str
    reason: str
    def __init__(self, rollout_id: _Optional[str] = ..., release_id: _Optional[str] = ..., state: _Optional[_Union[UpdateState, str]] = ..., agent_version: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class UpdateNotice(_message.Message):
    __slots__ = ("rollout_id", "release_id", "version", "size_bytes", "sha256", "manifest", "signature", "deadline")
    ROLLOUT_ID_FIELD_NUMBER: _ClassVar[int]
    RELEASE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    rollout_id: str
    release_id: str
    version: str
    size_bytes: int
    sha256: str
    manifest: bytes
    signature: bytes
    deadline: _timestamp_pb2.Timestamp
    def __init__(self, rollout_id: _Optional[str] = ..., release_id: _Optional[str] = ..., version: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., manifest: _Optional[bytes] = ..., signature: _Optional[bytes] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class DownloadArtifactRequest(_message.Message):
    __slots__ = ("release_id", "offset")
    RELEASE_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    release_id: str
    offset: int
    def __init__(self, release_id: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class ArtifactChunk(_message.Message):
    __slots__ = ("offset", "data", "total_size")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    total_size: int
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_size: _Optional[int] = ...) -> None: ...
