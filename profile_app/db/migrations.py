"""The schema of the SQLite file: each entry moves it one version up (PRAGMA user_version)."""

from __future__ import annotations

# Each entry moves the schema one version up; PRAGMA user_version records how far it got.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE profiles (
        user_id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        interests TEXT NOT NULL,
        bio TEXT NOT NULL,
        rev INTEGER NOT NULL,
        task_id TEXT,
        matches TEXT,
        matches_computed_at REAL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX profiles_rev ON profiles (rev);
    CREATE TABLE tasks (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        payload TEXT NOT NULL,
        status TEXT NOT NULL,
        executor TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL,
        created_at REAL NOT NULL,
        run_after REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        lease_owner TEXT,
        lease_until REAL,
        error TEXT,
        progress REAL,
        result TEXT
    );
    CREATE INDEX tasks_claimable ON tasks (kind, run_after, seq) WHERE status = 'queued';
    CREATE INDEX tasks_status ON tasks (status, seq);
    CREATE INDEX tasks_kind ON tasks (kind, seq);
    CREATE INDEX tasks_leased ON tasks (lease_until) WHERE status = 'running';
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    INSERT INTO meta (key, value) VALUES ('instance_id', lower(hex(randomblob(8))));
    CREATE TABLE idempotency_keys (
        key TEXT PRIMARY KEY,
        request_hash TEXT NOT NULL,
        response TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    """,
    """
    CREATE TABLE kind_placements (
        kind TEXT PRIMARY KEY,
        placement TEXT NOT NULL,
        reason TEXT NOT NULL,
        observations INTEGER NOT NULL,
        cpu_share REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    """,
    """
    ALTER TABLE tasks ADD COLUMN logs TEXT;
    """,
    # The dashboard's history reads tasks by when they were created and finished.
    """
    CREATE INDEX tasks_created ON tasks (created_at);
    CREATE INDEX tasks_finished ON tasks (finished_at);
    """,
    # How many tasks are in each status, kept by triggers in the writing transaction: GET
    # /health reads two rows instead of counting the queue (0.5 ms at 3,000 queued, 18 ms at
    # 100,000), and the count is exactly what is committed.
    """
    CREATE TABLE task_counts (status TEXT PRIMARY KEY, n INTEGER NOT NULL) WITHOUT ROWID;
    INSERT INTO task_counts (status, n) SELECT status, COUNT(*) FROM tasks GROUP BY status;
    CREATE TRIGGER task_counts_insert AFTER INSERT ON tasks BEGIN
        INSERT INTO task_counts (status, n) VALUES (NEW.status, 1)
            ON CONFLICT (status) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER task_counts_update AFTER UPDATE OF status ON tasks
    WHEN OLD.status IS NOT NEW.status BEGIN
        UPDATE task_counts SET n = n - 1 WHERE status = OLD.status;
        INSERT INTO task_counts (status, n) VALUES (NEW.status, 1)
            ON CONFLICT (status) DO UPDATE SET n = n + 1;
    END;
    CREATE TRIGGER task_counts_delete AFTER DELETE ON tasks BEGIN
        UPDATE task_counts SET n = n - 1 WHERE status = OLD.status;
    END;
    """,
    # Scheduling (docs/scheduling.md). `run_after` is 0 for a task due now, whatever the wall
    # clock does, else the wall-clock time it is held until (a run_at, or a retry's backoff,
    # which began at `held_since`). `rank` orders due tasks: when the task became (or
    # becomes) due minus priority x PROFILE_APP_PRIORITY_AGING_S, so that ORDER BY rank is
    # "highest effective priority first, then first due" and aging needs no update. Due-now
    # and held tasks have indexes of their own: a million tasks scheduled for later never
    # lie in the way of the claim's scan. `unique_key` is held while the task is unfinished
    # and for `unique_for_s` after; an expired key is cleared by the next insert of it.
    # `kind_controls`: what operators set per kind (pause). `attempts`: the attempt ledger,
    # one row per attempt started (by a trigger, in the claiming statement itself), ended by
    # the statement that ends the attempt. `schedules`: each schedule's next tick.
    """
    ALTER TABLE tasks ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE tasks ADD COLUMN rank REAL NOT NULL DEFAULT 0;
    ALTER TABLE tasks ADD COLUMN held_since REAL;
    ALTER TABLE tasks ADD COLUMN unique_key TEXT;
    ALTER TABLE tasks ADD COLUMN unique_for_s REAL;
    UPDATE tasks SET rank = run_after;
    DROP INDEX tasks_claimable;
    CREATE INDEX tasks_due ON tasks (kind, rank, seq) WHERE status = 'queued' AND run_after = 0;
    CREATE INDEX tasks_held ON tasks (kind, run_after) WHERE status = 'queued' AND run_after > 0;
    CREATE INDEX tasks_backoff ON tasks (held_since) WHERE status = 'queued' AND held_since IS NOT NULL;
    CREATE INDEX tasks_running ON tasks (kind) WHERE status = 'running';
    CREATE UNIQUE INDEX tasks_unique ON tasks (kind, unique_key) WHERE unique_key IS NOT NULL;
    CREATE TABLE kind_controls (
        kind TEXT PRIMARY KEY,
        paused INTEGER NOT NULL DEFAULT 0,
        updated_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE attempts (
        id INTEGER PRIMARY KEY,
        task_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        executor TEXT NOT NULL,
        worker TEXT,
        started_at REAL NOT NULL,
        finished_at REAL,
        outcome TEXT,
        error TEXT
    );
    CREATE INDEX attempts_task ON attempts (task_id, id);
    CREATE INDEX attempts_started ON attempts (kind, started_at);
    CREATE TRIGGER attempts_start AFTER UPDATE OF status ON tasks
    WHEN NEW.status = 'running' AND OLD.status IS NOT 'running' BEGIN
        INSERT INTO attempts (task_id, kind, attempt, executor, worker, started_at)
            VALUES (NEW.id, NEW.kind, NEW.attempts, NEW.executor, NEW.lease_owner, NEW.started_at);
    END;
    CREATE TRIGGER attempts_forget AFTER DELETE ON tasks BEGIN
        DELETE FROM attempts WHERE task_id = OLD.id;
    END;
    CREATE TABLE schedules (
        name TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        payload TEXT NOT NULL,
        cron TEXT,
        every_s REAL,
        next_run_at REAL NOT NULL,
        last_run_at REAL,
        last_task_id TEXT,
        missed INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    """,
    # tasks_leased (lease_until of running tasks) served no query: the lease recovery reads
    # running tasks by status (its OR over the owner cannot use it), and every claim, lease
    # renewal and finish paid for its entries: a page or two of each finishing transaction.
    """
    DROP INDEX IF EXISTS tasks_leased;
    """,
    # tasks_finished held every unfinished task too, under NULL: each finish moved an entry
    # from the NULL run to the end, two leaf pages of every finishing transaction. The
    # queries that read it (pruning, the queue history) all ask for finished tasks.
    """
    DROP INDEX tasks_finished;
    CREATE INDEX tasks_finished ON tasks (finished_at) WHERE finished_at IS NOT NULL;
    """,
    # Expired Idempotency-Keys are forgotten in batches, oldest first (profiles.py
    # FORGET_KEYS): without this index each batch read the whole table.
    """
    CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);
    """,
)
