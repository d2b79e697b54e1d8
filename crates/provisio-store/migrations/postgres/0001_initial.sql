-- Documents: enrollments, groups, registration records, policies, hubs, certificates and
-- instance metadata. Bodies are JSON written by the engine; the store only versions them.
-- Ids compare bytewise (COLLATE "C") so that paging by id is stable on any locale.
CREATE TABLE documents (
    collection TEXT NOT NULL,
    id TEXT COLLATE "C" NOT NULL,
    etag TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    tag TEXT COLLATE "C",
    PRIMARY KEY (collection, id)
);
CREATE INDEX documents_tag ON documents (collection, tag, id) WHERE tag IS NOT NULL;

-- One row per registration attempt, so any node can answer a poll.
CREATE TABLE operations (
    id TEXT PRIMARY KEY,
    registration_id TEXT NOT NULL,
    registration_etag TEXT NOT NULL,
    registration_body TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX operations_created_at ON operations (created_at);
