-- Herald IPAM schema (embedded SQLite). The constraints here, not the service's memory, are what
-- guarantee that no address is ever held by two owners (ARCHITECTURE.md, invariant 3).

-- Times are unix microseconds, identical in Postgres and SQLite.
CREATE TABLE pools (
    name        TEXT PRIMARY KEY,
    -- Bumped on every change. Claims reference (name, generation), so an allocation planned
    -- against an outdated pool spec fails its foreign key instead of landing outside it.
    generation  BIGINT NOT NULL,
    spec        TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    UNIQUE (name, generation)
);

-- A pool's addresses as CIDR blocks. SQLite has no exclusion constraints; the embedded
-- store has one writer, and pool writes check for overlap inside their transaction.
CREATE TABLE pool_blocks (
    pool        TEXT NOT NULL REFERENCES pools (name) ON DELETE CASCADE,
    block       TEXT NOT NULL,
    PRIMARY KEY (pool, block)
);

-- One row per address in use. The primary key makes an address unique; the tag says who
-- holds it: 'o:<owner uid>' for one owner, 's:<sharing key>|<policy>' for a sharing group.
CREATE TABLE ip_claims (
    ip               BLOB PRIMARY KEY,
    tag              TEXT NOT NULL,
    pool             TEXT NOT NULL,
    pool_generation  BIGINT NOT NULL,
    created_at       BIGINT NOT NULL,
    UNIQUE (ip, tag),
    FOREIGN KEY (pool, pool_generation) REFERENCES pools (name, generation) ON UPDATE CASCADE
);

-- One row per owner and family. An owner can only reference a claim under its own tag
-- (its uid, or its sharing key), so two owners meet on one address only by sharing a key.
CREATE TABLE allocations (
    owner_uid       TEXT NOT NULL,
    family          INTEGER NOT NULL,
    ip              BLOB NOT NULL,
    tag             TEXT NOT NULL,
    cluster_id      TEXT NOT NULL,
    namespace       TEXT NOT NULL,
    name            TEXT NOT NULL,
    sharing_key     TEXT NOT NULL,
    traffic_policy  INTEGER NOT NULL,
    ports           TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    PRIMARY KEY (owner_uid, family),
    FOREIGN KEY (ip, tag) REFERENCES ip_claims (ip, tag),
    CONSTRAINT allocations_tag_is_owners CHECK (
        tag = 'o:' || owner_uid
        OR (sharing_key <> '' AND substr(tag, 1, length(sharing_key) + 3) = 's:' || sharing_key || '|')
    )
);
CREATE INDEX allocations_ip ON allocations (ip);
CREATE INDEX allocations_namespace ON allocations (namespace, owner_uid);

-- Ports of owners that share an address: a port can be used once per address.
CREATE TABLE shared_ports (
    ip          BLOB NOT NULL,
    protocol    TEXT NOT NULL,
    port        INTEGER NOT NULL,
    owner_uid   TEXT NOT NULL,
    family      INTEGER NOT NULL,
    PRIMARY KEY (ip, protocol, port),
    FOREIGN KEY (owner_uid, family) REFERENCES allocations (owner_uid, family) ON DELETE CASCADE
);

-- The change log: every assignment, release and pool change, in commit order of their
-- revision. It is the allocation history and the source of the Watch stream.
CREATE TABLE events (
    revision    INTEGER PRIMARY KEY AUTOINCREMENT,
    at          BIGINT NOT NULL,
    kind        TEXT NOT NULL,
    ip          TEXT NOT NULL DEFAULT '',
    tag         TEXT NOT NULL DEFAULT '',
    pool        TEXT NOT NULL DEFAULT '',
    owner_uid   TEXT NOT NULL DEFAULT '',
    cluster_id  TEXT NOT NULL DEFAULT '',
    namespace   TEXT NOT NULL DEFAULT '',
    name        TEXT NOT NULL DEFAULT '',
    reason      TEXT NOT NULL DEFAULT ''
);
CREATE INDEX events_ip ON events (ip, revision) WHERE ip <> '';
CREATE INDEX events_owner ON events (owner_uid, revision) WHERE owner_uid <> '';
