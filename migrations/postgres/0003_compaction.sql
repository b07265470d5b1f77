-- Compaction of the change log. Routing-input rows (node, endpoints and policy changes)
-- only say "this key changed; reload it", so a row superseded by a later one for the same
-- key tells nobody anything once every replica's feed has passed it. Allocation history
-- and pool rows are never compacted: the History API promises them.

-- One row: the highest revision compaction has deleted. Below it the log is no longer
-- complete for routing inputs, so a Watch that resumes from before it is refused.
CREATE TABLE events_compaction (
    id        INTEGER PRIMARY KEY CHECK (id = 1),
    revision  BIGINT NOT NULL
);
INSERT INTO events_compaction (id, revision) VALUES (1, 0);

-- Finds a key's later rows when deciding whether one is superseded.
CREATE INDEX events_routing_node ON events (name, revision)
    WHERE kind IN ('node_changed', 'node_deleted');
CREATE INDEX events_routing_endpoints ON events (owner_uid, revision)
    WHERE kind = 'endpoints_changed';
CREATE INDEX events_routing_policy ON events (revision)
    WHERE kind = 'policy_changed';
