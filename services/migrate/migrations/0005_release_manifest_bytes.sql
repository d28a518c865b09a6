-- Keep each release manifest byte for byte: its Ed25519 signature covers those exact
-- bytes, and jsonb does not preserve key order or spacing.
-- depends: 0003_releases_and_rollouts

ALTER TABLE releases ADD COLUMN manifest_bytes bytea;
UPDATE releases SET manifest_bytes = convert_to(manifest::text, 'UTF8');
ALTER TABLE releases ALTER COLUMN manifest_bytes SET NOT NULL;
