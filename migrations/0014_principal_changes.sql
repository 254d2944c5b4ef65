-- Every gateway caches resolved API keys for at most GATEWAY_KEY_CACHE_MS (1 s): a change
-- of a key (revoked, expired, rotated, deleted) notifies the `principals` channel, so
-- every gateway drops its cached keys at once (`keycache`), and the cache's lifetime
-- bounds how long a missed notification could keep a key working.
CREATE FUNCTION principals_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('principals', '');
    RETURN NULL;
END $$;
CREATE TRIGGER principals_notify AFTER UPDATE OR DELETE ON principals
    FOR EACH STATEMENT EXECUTE FUNCTION principals_notify();
