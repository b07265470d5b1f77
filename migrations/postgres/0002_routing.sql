-- What the route sets are computed from: nodes, per-Service endpoint facts, the BGP policy,
-- and what the speakers report they actually announce. Specs are JSON of the routing
-- domain types, validated by the service before they are written.
CREATE TABLE nodes (
    name        TEXT PRIMARY KEY,
    spec        TEXT NOT NULL,
    updated_at  BIGINT NOT NULL
);

CREATE TABLE service_endpoints (
    owner_uid   TEXT PRIMARY KEY,
    spec        TEXT NOT NULL,
    updated_at  BIGINT NOT NULL
);

-- One row: the policy is replaced as a whole.
CREATE TABLE bgp_policy (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    spec        TEXT NOT NULL,
    updated_at  BIGINT NOT NULL
);

CREATE TABLE speaker_states (
    node         TEXT PRIMARY KEY,
    spec         TEXT NOT NULL,
    reported_at  BIGINT NOT NULL
);
