-- Operator commands and their results.
-- depends: 0001_agents_and_enrollment

CREATE TABLE commands (
    id                  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    agent_id            uuid NOT NULL REFERENCES agents (id),
    command_line        text NOT NULL,
    reason              text NOT NULL DEFAULT '',
    requested_by        text NOT NULL,
    state               text NOT NULL DEFAULT 'queued' CHECK (state IN (
                            'queued', 'sent', 'running', 'succeeded', 'failed',
                            'timed_out', 'expired', 'cancelled')),
    timeout_seconds     integer NOT NULL CHECK (timeout_seconds > 0),
    expires_at          timestamptz NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now(),
    sent_at             timestamptz,
    started_at          timestamptz,
    finished_at         timestamptz,
    exit_code           integer,
    stdout              bytea,
    stderr              bytea,
    stdout_truncated    boolean NOT NULL DEFAULT false,
    stderr_truncated    boolean NOT NULL DEFAULT false,
    duration_ms         bigint,
    error               text
);

-- Pending work per agent, read on every reconnect.
CREATE INDEX commands_agent_pending ON commands (agent_id, created_at)
    WHERE state IN ('queued', 'sent', 'running');
CREATE INDEX commands_agent_created ON commands (agent_id, created_at DESC);
CREATE INDEX commands_state_created ON commands (state, created_at DESC);
