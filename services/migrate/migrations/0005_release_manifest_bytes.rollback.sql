ALTER TABLE releases DROP COLUMN manifest_bytes;
