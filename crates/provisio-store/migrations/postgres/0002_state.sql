-- A second, opaque label per document: for registration records, their outcome
-- (assigned, failed, disabled), so that they can be counted by it without reading bodies.
ALTER TABLE documents ADD COLUMN state TEXT COLLATE "C";
CREATE INDEX documents_state ON documents (collection, state) WHERE state IS NOT NULL;
