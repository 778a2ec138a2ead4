-- Events added through the API by other applications (oVirt's external events): who sent
-- it and its id there, unique per origin. The engine's own events have neither.
ALTER TABLE events ADD COLUMN origin TEXT;
ALTER TABLE events ADD COLUMN custom_id BIGINT;
CREATE UNIQUE INDEX events_origin_custom_id ON events (origin, custom_id);
