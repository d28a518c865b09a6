-- Signed agent releases, rollouts in waves, and each agent's progress in a rollout.
-- depends: 0001_agents_and_enrollment

CREATE TABLE releases (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    version         text NOT NULL,
    os_name         text NOT NULL,
    architecture    text NOT NULL,
    size_bytes      bigint NOT NULL CHECK (size_bytes >= 0),
    sha256          text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    signature       bytea NOT NULL,
    signing_key_id  text NOT NULL,
    manifest        jsonb NOT NULL,
    source          text NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (version, os_name, architecture)
);

CREATE TABLE rollouts (
    id                          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    target_version              text NOT NULL,
    selection                   jsonb NOT NULL,
    waves                       integer[] NOT NULL,
    max_parallel                integer NOT NULL CHECK (max_parallel > 0),
    failure_threshold_percent   numeric(5, 2) NOT NULL
                                    CHECK (failure_threshold_percent BETWEEN 0 AND 100),
    agent_timeout_seconds       integer NOT NULL CHECK (agent_timeout_seconds > 0),
    state                       text NOT NULL DEFAULT 'pending' CHECK (state IN (
                                    'pending', 'running', 'paused', 'completed', 'aborted')),
    state_reason                text NOT NULL DEFAULT '',
    current_wave                integer NOT NULL DEFAULT 0,
    created_by                  text NOT NULL,
    created_at                  timestamptz NOT NULL DEFAULT now(),
    started_at                  timestamptz,
    finished_at                 timestamptz,
    updated_at                  timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX rollouts_state ON rollouts (state);

CREATE TABLE rollout_agents (
    rollout_id      uuid NOT NULL REFERENCES rollouts (id),
    agent_id        uuid NOT NULL REFERENCES agents (id),
    wave            integer NOT NULL,
    state           text NOT NULL DEFAULT 'pending' CHECK (state IN (
                        'pending', 'notified', 'downloading', 'installing', 'succeeded',
                        'failed', 'rolled_back', 'timed_out')),
    from_version    text NOT NULL DEFAULT '',
    error           text NOT NULL DEFAULT '',
    notified_at     timestamptz,
    deadline_at     timestamptz,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (rollout_id, agent_id)
);

CREATE INDEX rollout_agents_state ON rollout_agents (rollout_id, wave, state);
CREATE INDEX rollout_agents_agent ON rollout_agents (agent_id);
