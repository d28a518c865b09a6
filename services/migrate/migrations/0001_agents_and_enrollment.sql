-- Agents, the enrollment tokens that admit them, and operator API tokens.
-- Secrets are never stored: only SHA-256 digests of random, high-entropy values.

CREATE TABLE enrollment_tokens (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    token_hash      bytea NOT NULL UNIQUE,
    token_prefix    text NOT NULL,
    description     text NOT NULL DEFAULT '',
    group_name      text NOT NULL DEFAULT '',
    labels          jsonb NOT NULL DEFAULT '{}'::jsonb,
    max_uses        integer CHECK (max_uses IS NULL OR max_uses > 0),
    use_count       integer NOT NULL DEFAULT 0 CHECK (use_count >= 0),
    expires_at      timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    created_by      text NOT NULL,
    last_used_at    timestamptz,
    revoked_at      timestamptz
);

CREATE TABLE agents (
    id                  uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    key_hash            bytea NOT NULL UNIQUE,
    machine_id          text NOT NULL,
    hostname            text NOT NULL,
    os_name             text NOT NULL DEFAULT '',
    os_version          text NOT NULL DEFAULT '',
    architecture        text NOT NULL DEFAULT '',
    agent_version       text NOT NULL DEFAULT '',
    addresses           text[] NOT NULL DEFAULT '{}',
    labels              jsonb NOT NULL DEFAULT '{}'::jsonb,
    group_name          text NOT NULL DEFAULT '',
    enrollment_token_id uuid REFERENCES enrollment_tokens (id),
    created_at          timestamptz NOT NULL DEFAULT now(),
    first_connected_at  timestamptz,
    last_seen_at        timestamptz,
    revoked_at          timestamptz,
    revoked_reason      text,
    replaced_by         uuid REFERENCES agents (id)
);

-- One active agent per machine: re-enrolling must revoke the old one first.
CREATE UNIQUE INDEX agents_active_machine_id ON agents (machine_id) WHERE revoked_at IS NULL;
CREATE INDEX agents_hostname ON agents (hostname);
CREATE INDEX agents_group_name ON agents (group_name);
CREATE INDEX agents_labels ON agents USING gin (labels);

CREATE TABLE api_tokens (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    name            text NOT NULL,
    token_hash      bytea NOT NULL UNIQUE,
    token_prefix    text NOT NULL,
    role            text NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    created_by      text NOT NULL,
    expires_at      timestamptz,
    last_used_at    timestamptz,
    revoked_at      timestamptz
);
