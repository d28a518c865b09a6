DROP TABLE rollout_agents;
DROP TABLE rollouts;
DROP TABLE releases;
