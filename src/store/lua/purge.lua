-- Revokes a session: deletes every key of it.
-- KEYS: 1 session, 2 key index, 3 used-refresh set
-- Returns {user, device} or {} when there was no session.
return purge_session(KEYS[1], KEYS[2], KEYS[3])
