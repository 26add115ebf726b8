-- One row that readiness rewrites to prove a commit still goes through after one failed
-- (store/rules.py CommitHealth). Nothing else reads it.
CREATE TABLE write_probe (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    written_at REAL NOT NULL
);
