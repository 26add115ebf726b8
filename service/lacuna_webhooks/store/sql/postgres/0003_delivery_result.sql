-- A delivery's result (SPEC §6): the JSON object its handler's handle() returned on the
-- attempt that completed it; NULL when it returned none or has not completed.
ALTER TABLE deliveries ADD COLUMN result jsonb;
