import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AgentStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGENT_STATUS_UNSPECIFIED: _ClassVar[AgentStatus]
    AGENT_STATUS_ONLINE: _ClassVar[AgentStatus]
    AGENT_STATUS_OFFLINE: _ClassVar[AgentStatus]
    AGENT_STATUS_NEVER_CONNECTED: _ClassVar[AgentStatus]
    AGENT_STATUS_REVOKED: _ClassVar[AgentStatus]

class CommandState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMMAND_STATE_UNSPECIFIED: _ClassVar[CommandState]
    COMMAND_STATE_QUEUED: _ClassVar[CommandState]
    COMMAND_STATE_SENT: _ClassVar[CommandState]
    COMMAND_STATE_RUNNING: _ClassVar[CommandState]
    COMMAND_STATE_SUCCEEDED: _ClassVar[CommandState]
    COMMAND_STATE_FAILED: _ClassVar[CommandState]
    COMMAND_STATE_TIMED_OUT: _ClassVar[CommandState]
    COMMAND_STATE_EXPIRED: _ClassVar[CommandState]
    COMMAND_STATE_CANCELLED: _ClassVar[CommandState]

class EnrollmentTokenState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENROLLMENT_TOKEN_STATE_UNSPECIFIED: _ClassVar[EnrollmentTokenState]
    ENROLLMENT_TOKEN_STATE_ACTIVE: _ClassVar[EnrollmentTokenState]
    ENROLLMENT_TOKEN_STATE_EXPIRED: _ClassVar[EnrollmentTokenState]
    ENROLLMENT_TOKEN_STATE_EXHAUSTED: _ClassVar[EnrollmentTokenState]
    ENROLLMENT_TOKEN_STATE_REVOKED: _ClassVar[EnrollmentTokenState]
AGENT_STATUS_UNSPECIFIED: AgentStatus
AGENT_STATUS_ONLINE: AgentStatus
AGENT_STATUS_OFFLINE: AgentStatus
AGENT_STATUS_NEVER_CONNECTED: AgentStatus
AGENT_STATUS_REVOKED: AgentStatus
COMMAND_STATE_UNSPECIFIED: CommandState
COMMAND_STATE_QUEUED: CommandState
COMMAND_STATE_SENT: CommandState
COMMAND_STATE_RUNNING: CommandState
COMMAND_STATE_SUCCEEDED: CommandState
COMMAND_STATE_FAILED: CommandState
COMMAND_STATE_TIMED_OUT: CommandState
COMMAND_STATE_EXPIRED: CommandState
COMMAND_STATE_CANCELLED: CommandState
ENROLLMENT_TOKEN_STATE_UNSPECIFIED: EnrollmentTokenState
ENROLLMENT_TOKEN_STATE_ACTIVE: EnrollmentTokenState
ENROLLMENT_TOKEN_STATE_EXPIRED: EnrollmentTokenState
ENROLLMENT_TOKEN_STATE_EXHAUSTED: EnrollmentTokenState
ENROLLMENT_TOKEN_STATE_REVOKED: EnrollmentTokenState

class HostFacts(_message.Message):
    __slots__ = ("hostname", "machine_id", "os_name", "os_version", "architecture", "agent_version", "addresses", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    MACHINE_ID_FIELD_NUMBER: _ClassVar[int]
    OS_NAME_FIELD_NUMBER: _ClassVar[int]
    OS_VERSION_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    machine_id: str
    os_name: str
    os_version: str
    architecture: str
    agent_version: str
    addresses: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.ScalarMap[str, str]
    def __init__(self, hostname: _Optional[str] = ..., machine_id: _Optional[str] = ..., os_name: _Optional[str] = ..., os_version: _Optional[str] = ..., architecture: _Optional[str] = ..., agent_version: _Optional[str] = ..., addresses: _Optional[_Iterable[str]] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class SessionSettings(_message.Message):
    __slots__ = ("heartbeat_interval", "offline_threshold", "max_output_bytes", "max_message_bytes", "min_keepalive_ping_interval", "gateway_instance_id")
    HEARTBEAT_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    OFFLINE_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MIN_KEEPALIVE_PING_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval: _duration_pb2.Duration
    offline_threshold: _duration_pb2.Duration
    max_output_bytes: int
    max_message_bytes: int
    min_keepalive_ping_interval: _duration_pb2.Duration
    gateway_instance_id: str
    def __init__(self, heartbeat_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., offline_threshold: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_output_bytes: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., min_keepalive_ping_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., gateway_instance_id: _Optional[str] = ...) -> None: ...

class PageRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "sort", "descending")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SORT_FIELD_NUMBER: _ClassVar[int]
    DESCENDING_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    sort: str
    descending: bool
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., sort: _Optional[str] = ..., descending: _Optional[bool] = ...) -> None: ...
