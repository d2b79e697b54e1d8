-- Documents: enrollments, groups, registration records, policies and instance metadata.
-- Bodies are JSON written by the engine; the store only versions them (etag).
CREATE TABLE documents (
    collection TEXT NOT NULL,
    id TEXT NOT NULL,
    etag TEXT NOT NULL,
    body TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (collection, id)
) WITHOUT ROWID;

-- One row per registration attempt, so any node can answer a poll.
CREATE TABLE operations (
    id TEXT PRIMARY KEY NOT NULL,
    registration_id TEXT NOT NULL,
    registration_etag TEXT NOT NULL,
    registration_body TEXT NOT NULL,
    created_at INTEGER NOT NULL
);
CREATE INDEX operations_created_at ON operations (created_at);
