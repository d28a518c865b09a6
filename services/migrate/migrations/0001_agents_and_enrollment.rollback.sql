DROP TABLE api_tokens;
DROP TABLE agents;
DROP TABLE enrollment_tokens;
