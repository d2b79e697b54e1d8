-- A secondary key per document: for registration records, the enrollment group they
-- went through, so a group's registrations can be listed without a scan.
ALTER TABLE documents ADD COLUMN tag TEXT;
CREATE INDEX documents_tag ON documents (collection, tag, id) WHERE tag IS NOT NULL;
