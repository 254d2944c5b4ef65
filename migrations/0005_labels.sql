-- Labels: free key/value metadata on resources (validated by the gateway), for
-- selection in lists (`?label=env=prod`).
ALTER TABLE resources ADD COLUMN labels jsonb NOT NULL DEFAULT '{}';
CREATE INDEX resources_labels ON resources USING gin (labels jsonb_path_ops) WHERE deleted_at IS NULL;
