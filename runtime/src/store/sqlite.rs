//! The embedded SQLite run store.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};

use super::{
    disown, host_name, now_ms, own, own_process_start, owns, pid_alive, process_alive, Attempt, BackfillPartition,
    BackfillRecord, CheckFilter, Checkpoint, Decision, Error, NewRun, PlannedSwitch, PublishEntry, Result, RunFilter,
    RunRecord, RunStore, Status, StepRows, StoredCheck,
};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pipeline_run (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    pipeline        TEXT NOT NULL,
    partition       TEXT,
    logical_date    TEXT,
    status          TEXT NOT NULL,
    attempt         INTEGER NOT NULL DEFAULT 1,
    started_at_ms   INTEGER NOT NULL,
    finished_at_ms  INTEGER,
    heartbeat_at_ms INTEGER NOT NULL,
    pid             INTEGER NOT NULL,
    host            TEXT NOT NULL,
    error           TEXT,
    config_sha256   TEXT NOT NULL,
    plugins_json    TEXT NOT NULL,
    fingerprint     TEXT NOT NULL,
    steps_json      TEXT NOT NULL DEFAULT '[]',
    staging_json    TEXT NOT NULL DEFAULT '[]',
    watermark_start TEXT,
    watermark_end   TEXT,
    backfill_id     INTEGER,
    decided_at_ms   INTEGER,
    note            TEXT,
    proc_start      TEXT
);
CREATE INDEX IF NOT EXISTS pipeline_run_by_pipeline ON pipeline_run (pipeline, partition, status);
CREATE TABLE IF NOT EXISTS publish_audit (
    run_id    INTEGER NOT NULL REFERENCES pipeline_run(id),
    step      TEXT NOT NULL,
    path      TEXT NOT NULL,
    partition TEXT,
    action    TEXT NOT NULL,
    at_ms     INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS publish_audit_by_run ON publish_audit (run_id);
CREATE TABLE IF NOT EXISTS commit_switch (
    run_id     INTEGER NOT NULL REFERENCES pipeline_run(id),
    seq        INTEGER NOT NULL,
    step       TEXT NOT NULL,
    kind       TEXT NOT NULL,
    staged     TEXT NOT NULL,
    target     TEXT NOT NULL,
    partition  TEXT,
    replaces   INTEGER NOT NULL,
    token      TEXT NOT NULL,
    target_token TEXT,
    done_at_ms INTEGER,
    PRIMARY KEY (run_id, seq)
);
CREATE TABLE IF NOT EXISTS backfill (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    pipeline       TEXT NOT NULL,
    spec           TEXT NOT NULL,
    parallel       INTEGER NOT NULL,
    status         TEXT NOT NULL,
    created_at_ms  INTEGER NOT NULL,
    finished_at_ms INTEGER,
    pid             INTEGER,
    host            TEXT,
    heartbeat_at_ms INTEGER
);
CREATE TABLE IF NOT EXISTS backfill_partition (
    backfill_id INTEGER NOT NULL REFERENCES backfill(id),
    ord         INTEGER NOT NULL,
    partition   TEXT NOT NULL,
    status      TEXT NOT NULL,
    run_id      INTEGER,
    error       TEXT,
    PRIMARY KEY (backfill_id, partition)
);
CREATE TABLE IF NOT EXISTS run_attempt (
    run_id  INTEGER NOT NULL REFERENCES pipeline_run(id),
    step    TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    error   TEXT,
    at_ms   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS data_quality_check (
    run_id      INTEGER NOT NULL REFERENCES pipeline_run(id),
    partition   TEXT,
    dataset     TEXT NOT NULL,
    check_name  TEXT NOT NULL,
    severity    TEXT NOT NULL,
    passed      INTEGER NOT NULL,
    observed    TEXT,
    threshold   TEXT,
    failing_rows INTEGER,
    sample_json TEXT,
    metrics_json TEXT
);
CREATE TABLE IF NOT EXISTS watermark (
    pipeline   TEXT NOT NULL,
    source     TEXT NOT NULL,
    value      TEXT NOT NULL,
    run_id     INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (pipeline, source)
);
CREATE TABLE IF NOT EXISTS source_schema (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    pipeline     TEXT NOT NULL,
    source       TEXT NOT NULL,
    fingerprint  TEXT NOT NULL,
    columns_json TEXT NOT NULL,
    action       TEXT NOT NULL,
    run_id       INTEGER NOT NULL,
    seen_ms      INTEGER NOT NULL,
    UNIQUE (pipeline, source, fingerprint, action)
);
CREATE TABLE IF NOT EXISTS watermark_audit (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    pipeline   TEXT NOT NULL,
    source     TEXT NOT NULL,
    old_value  TEXT,
    new_value  TEXT,
    action     TEXT NOT NULL,
    by_whom    TEXT NOT NULL,
    at_ms      INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS checkpoint (
    run_id    INTEGER NOT NULL REFERENCES pipeline_run(id),
    step      TEXT NOT NULL,
    data_json TEXT NOT NULL,
    states    BLOB NOT NULL,
    at_ms     INTEGER NOT NULL,
    PRIMARY KEY (run_id, step)
);
"#;

/// The SQLite store. One connection, shared behind a mutex (runs write a few rows each).
pub struct SqliteStore {
    conn: Mutex<Connection>,
    path: PathBuf,
    /// The file's canonical path: which store a run id belongs to (see [`super::own`]).
    key: PathBuf,
}

impl SqliteStore {
    /// Open (creating if needed) the store at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let open_err = |message: String| Error::Open { path: path.to_path_buf(), message };
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| open_err(format!("cannot create {}: {e}", dir.display())))?;
            }
        }
        let conn = Connection::open(path).map_err(|e| open_err(e.to_string()))?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(|e| open_err(e.to_string()))?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(|e| open_err(e.to_string()))?;
        conn.pragma_update(None, "synchronous", "FULL").map_err(|e| open_err(e.to_string()))?;
        // one transaction: a new store costs one WAL sync, not one per table; IMMEDIATE, so
        // two processes upgrading an older store at once do not both add its new columns
        let create = |conn: &Connection| -> rusqlite::Result<()> {
            conn.execute_batch("BEGIN IMMEDIATE")?;
            let upgrade = upgrade_statements(conn)?;
            conn.execute_batch(&format!(
                "{SCHEMA}\n{upgrade}\nINSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', '2');\nCOMMIT;"
            ))
        };
        create(&conn).map_err(|e| {
            let _ = conn.execute_batch("ROLLBACK");
            open_err(format!("cannot create tables: {e}"))
        })?;
        let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        Ok(SqliteStore { conn: Mutex::new(conn), path: path.to_path_buf(), key })
    }

    /// The file this store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Columns added since schema version 1 (table, column, declaration): a store written by
/// an earlier weir gains them when opened.
const ADDED_COLUMNS: [(&str, &str, &str); 8] = [
    ("pipeline_run", "decided_at_ms", "INTEGER"),
    ("pipeline_run", "note", "TEXT"),
    ("pipeline_run", "proc_start", "TEXT"),
    ("commit_switch", "target_token", "TEXT"),
    ("data_quality_check", "metrics_json", "TEXT"),
    ("backfill", "pid", "INTEGER"),
    ("backfill", "host", "TEXT"),
    ("backfill", "heartbeat_at_ms", "INTEGER"),
];

/// `ALTER TABLE` statements bringing an older store's tables up to date.
fn upgrade_statements(conn: &Connection) -> rusqlite::Result<String> {
    let mut out = String::new();
    for (table, column, decl) in ADDED_COLUMNS {
        let mut stmt = conn.prepare("SELECT name FROM pragma_table_info(?1)")?;
        let have: Vec<String> = stmt.query_map([table], |r| r.get(0))?.collect::<rusqlite::Result<_>>()?;
        // a table not there yet is created by SCHEMA with every column
        if !have.is_empty() && !have.iter().any(|h| h == column) {
            out.push_str(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl};\n"));
        }
    }
    Ok(out)
}

const COLUMNS: &str = "id, pipeline, partition, status, attempt, started_at_ms, finished_at_ms, heartbeat_at_ms, pid, host, error, config_sha256, plugins_json, fingerprint, steps_json, staging_json, backfill_id, decided_at_ms, note, proc_start, watermark_start, watermark_end";

fn read_run(row: &Row<'_>) -> rusqlite::Result<RunRecord> {
    let status: String = row.get(3)?;
    let plugins: String = row.get(12)?;
    let steps: String = row.get(14)?;
    let staging: String = row.get(15)?;
    Ok(RunRecord {
        id: row.get(0)?,
        pipeline: row.get(1)?,
        partition: row.get(2)?,
        status: Status::parse(&status).unwrap_or(Status::Failed),
        attempt: row.get(4)?,
        started_at_ms: row.get(5)?,
        finished_at_ms: row.get(6)?,
        heartbeat_at_ms: row.get(7)?,
        pid: row.get(8)?,
        host: row.get(9)?,
        error: row.get(10)?,
        config_sha256: row.get(11)?,
        plugins: serde_json::from_str(&plugins).unwrap_or_default(),
        fingerprint: row.get(13)?,
        steps: serde_json::from_str(&steps).unwrap_or_default(),
        staging: serde_json::from_str(&staging).unwrap_or_default(),
        published: Vec::new(),
        attempts: Vec::new(),
        backfill_id: row.get(16)?,
        decision: row.get::<_, Option<i64>>(17)?.map(|at_ms| Decision { at_ms, switches: Vec::new() }),
        note: row.get(18)?,
        proc_start: row.get(19)?,
        watermark_start: row.get(20)?,
        watermark_end: row.get(21)?,
    })
}

fn read_switch(row: &Row<'_>) -> rusqlite::Result<PlannedSwitch> {
    Ok(PlannedSwitch {
        step: row.get(0)?,
        kind: row.get(1)?,
        staged: PathBuf::from(row.get::<_, String>(2)?),
        target: PathBuf::from(row.get::<_, String>(3)?),
        partition: row.get(4)?,
        replaces: row.get(5)?,
        token: row.get(6)?,
        done_at_ms: row.get(7)?,
        target_token: row.get(8)?,
    })
}

/// Whether the process that runs `r` (recorded on this host) still does: this process only
/// for the runs it holds; another by its identity, so a reused pid is not taken for it.
fn alive_here(store: &Path, r: &RunRecord) -> bool {
    if r.pid == std::process::id() && r.proc_start == own_process_start() {
        return owns(store, r.id);
    }
    process_alive(r.pid, r.proc_start.as_deref())
}

impl SqliteStore {
    fn with_published(&self, conn: &Connection, mut runs: Vec<RunRecord>) -> Result<Vec<RunRecord>> {
        let mut stmt =
            conn.prepare("SELECT step, path, partition, action FROM publish_audit WHERE run_id = ?1 ORDER BY rowid")?;
        for r in &mut runs {
            r.published = stmt
                .query_map([r.id], |row| {
                    Ok(PublishEntry {
                        step: row.get(0)?,
                        path: PathBuf::from(row.get::<_, String>(1)?),
                        partition: row.get(2)?,
                        action: row.get(3)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
        }
        let mut attempts =
            conn.prepare("SELECT step, attempt, error, at_ms FROM run_attempt WHERE run_id = ?1 ORDER BY rowid")?;
        for r in &mut runs {
            r.attempts = attempts
                .query_map([r.id], |row| {
                    Ok(Attempt { step: row.get(0)?, attempt: row.get(1)?, error: row.get(2)?, at_ms: row.get(3)? })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
        }
        let mut switches = conn.prepare(
            "SELECT step, kind, staged, target, partition, replaces, token, done_at_ms, target_token FROM commit_switch WHERE run_id = ?1 ORDER BY seq",
        )?;
        for r in &mut runs {
            if let Some(d) = &mut r.decision {
                d.switches = switches.query_map([r.id], read_switch)?.collect::<rusqlite::Result<Vec<_>>>()?;
            }
        }
        Ok(runs)
    }
}

impl SqliteStore {
    fn load_backfills(&self, clause: &str, args: impl rusqlite::Params) -> Result<Vec<BackfillRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT id, pipeline, spec, parallel, status, created_at_ms, finished_at_ms, pid, host, heartbeat_at_ms FROM backfill {clause}"
        ))?;
        let (now, here) = (now_ms(), host_name());
        let mut out = stmt
            .query_map(args, |r| {
                let status: String = r.get(4)?;
                let mut b = BackfillRecord {
                    id: r.get(0)?,
                    pipeline: r.get(1)?,
                    spec: r.get(2)?,
                    parallel: r.get(3)?,
                    status: Status::parse(&status).unwrap_or(Status::Failed),
                    created_at_ms: r.get(5)?,
                    finished_at_ms: r.get(6)?,
                    pid: r.get(7)?,
                    host: r.get(8)?,
                    heartbeat_at_ms: r.get(9)?,
                    interrupted: None,
                    partitions: Vec::new(),
                };
                if b.status == Status::Running {
                    b.interrupted = match (b.pid, &b.host, b.heartbeat_at_ms) {
                        (Some(pid), Some(host), _) if *host == here && pid != std::process::id() && !pid_alive(pid) => {
                            Some(format!("its process {pid} on {host} is gone"))
                        }
                        (_, _, Some(at)) if now - at > super::LEASE.as_millis() as i64 => {
                            Some(format!("no heartbeat for {} s", (now - at) / 1000))
                        }
                        (_, _, None) => Some("it was started by a weir that kept no lease".into()),
                        _ => None,
                    };
                    if b.interrupted.is_some() {
                        b.status = Status::Interrupted;
                    }
                }
                Ok(b)
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let mut parts = conn.prepare(
            "SELECT partition, status, run_id, error FROM backfill_partition WHERE backfill_id = ?1 ORDER BY ord",
        )?;
        for b in &mut out {
            b.partitions = parts
                .query_map([b.id], |r| {
                    Ok(BackfillPartition {
                        partition: r.get(0)?,
                        status: r.get(1)?,
                        run_id: r.get(2)?,
                        error: r.get(3)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
        }
        Ok(out)
    }
}

impl RunStore for SqliteStore {
    fn begin_run(&self, run: &NewRun) -> Result<i64> {
        let mut conn = self.conn();
        // IMMEDIATE: the write lock is held from the check to the insert, so two processes
        // starting the same partition at once cannot both pass the check
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let live = tx
            .query_row(
                "SELECT id, pid, host FROM pipeline_run WHERE pipeline = ?1 AND partition IS ?2 AND status = 'RUNNING' ORDER BY id LIMIT 1",
                params![run.pipeline, run.partition],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, u32>(1)?, r.get::<_, String>(2)?)),
            )
            .optional()?;
        if let Some((id, pid, host)) = live {
            return Err(Error::Busy { id, pid, host });
        }
        // a run of the pipeline that decided to publish and broke off must be completed
        // first (whatever its partition): publishing over it could be undone when it is
        let unfinished = tx
            .query_row(
                "SELECT id FROM pipeline_run r WHERE pipeline = ?1 AND status = 'FAILED' AND decided_at_ms IS NOT NULL
                   AND EXISTS (SELECT 1 FROM commit_switch c WHERE c.run_id = r.id AND c.done_at_ms IS NULL)
                 ORDER BY id LIMIT 1",
                params![run.pipeline],
                |r| r.get::<_, i64>(0),
            )
            .optional()?;
        if let Some(id) = unfinished {
            return Err(Error::Unfinished { id });
        }
        let now = now_ms();
        let attempt: u32 = tx.query_row(
            "SELECT COUNT(*) + 1 FROM pipeline_run WHERE pipeline = ?1 AND partition IS ?2 AND fingerprint = ?3",
            params![run.pipeline, run.partition, run.fingerprint],
            |r| r.get(0),
        )?;
        tx.execute(
            "INSERT INTO pipeline_run (pipeline, partition, logical_date, status, attempt, started_at_ms, heartbeat_at_ms, pid, host, config_sha256, plugins_json, fingerprint, backfill_id, proc_start)
             VALUES (?1, ?2, ?2, 'RUNNING', ?3, ?4, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                run.pipeline,
                run.partition,
                attempt,
                now,
                std::process::id(),
                host_name(),
                run.config_sha256,
                serde_json::to_string(&run.plugins).unwrap_or_default(),
                run.fingerprint,
                run.backfill_id,
                own_process_start()
            ],
        )?;
        let id = tx.last_insert_rowid();
        let staging: Vec<String> =
            run.staging.iter().map(|p| p.to_string_lossy().replace("{run}", &id.to_string())).collect();
        tx.execute(
            "UPDATE pipeline_run SET staging_json = ?2 WHERE id = ?1",
            params![id, serde_json::to_string(&staging).unwrap_or_default()],
        )?;
        tx.commit()?;
        own(&self.key, id);
        Ok(id)
    }

    fn heartbeat(&self, id: i64) -> Result<()> {
        self.renew_lease(id).map(|_| ())
    }

    fn renew_lease(&self, id: i64) -> Result<bool> {
        let changed = self.conn().execute(
            "UPDATE pipeline_run SET heartbeat_at_ms = ?2
             WHERE id = ?1 AND status = 'RUNNING' AND pid = ?3 AND host = ?4 AND proc_start IS ?5",
            params![id, now_ms(), std::process::id(), host_name(), own_process_start()],
        )?;
        Ok(changed == 1)
    }

    fn record_decision(
        &self,
        id: i64,
        steps: &[StepRows],
        switches: &[PlannedSwitch],
        watermarks: &[super::WatermarkUpdate],
    ) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "UPDATE pipeline_run SET decided_at_ms = ?2, steps_json = ?3 WHERE id = ?1",
            params![id, now_ms(), serde_json::to_string(steps).unwrap_or_default()],
        )?;
        // the watermarks move with the decision to publish, in its transaction: never before
        for w in watermarks {
            tx.execute(
                "INSERT INTO watermark (pipeline, source, value, run_id, updated_ms)
                 SELECT pipeline, ?2, ?3, id, ?4 FROM pipeline_run WHERE id = ?1
                 ON CONFLICT (pipeline, source) DO UPDATE SET value = excluded.value, run_id = excluded.run_id, updated_ms = excluded.updated_ms",
                params![id, w.source, w.end, now_ms()],
            )?;
            tx.execute(
                "UPDATE pipeline_run SET watermark_start = ?2, watermark_end = ?3 WHERE id = ?1",
                params![id, w.start, w.end],
            )?;
        }
        for (seq, s) in switches.iter().enumerate() {
            tx.execute(
                "INSERT INTO commit_switch (run_id, seq, step, kind, staged, target, partition, replaces, token, target_token)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    id,
                    seq as i64,
                    s.step,
                    s.kind,
                    s.staged.to_string_lossy(),
                    s.target.to_string_lossy(),
                    s.partition,
                    s.replaces,
                    s.token,
                    s.target_token
                ],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn record_switch(&self, id: i64, seq: usize, e: &PublishEntry) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let now = now_ms();
        tx.execute(
            "UPDATE commit_switch SET done_at_ms = ?3 WHERE run_id = ?1 AND seq = ?2",
            params![id, seq as i64, now],
        )?;
        tx.execute(
            "INSERT INTO publish_audit (run_id, step, path, partition, action, at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![id, e.step, e.path.to_string_lossy(), e.partition, e.action, now],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn record_attempt(&self, id: i64, step: &str, attempt: u32, error: Option<&str>) -> Result<()> {
        self.conn().execute(
            "INSERT INTO run_attempt (run_id, step, attempt, error, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id, step, attempt, error, now_ms()],
        )?;
        Ok(())
    }

    fn finish_run(&self, id: i64, status: Status, steps: &[StepRows], error: Option<&str>) -> Result<()> {
        disown(&self.key, id);
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "UPDATE pipeline_run SET status = ?2, finished_at_ms = ?3, error = ?5,
                    steps_json = CASE WHEN ?4 IS NULL THEN steps_json ELSE ?4 END WHERE id = ?1",
            params![
                id,
                status.as_str(),
                now_ms(),
                (!steps.is_empty()).then(|| serde_json::to_string(steps).unwrap_or_default()),
                error
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn recover_stale(&self, pipeline: Option<&str>, lease_ms: i64, by: &str) -> Result<Vec<RunRecord>> {
        let mut conn = self.conn();
        // IMMEDIATE: the write lock is taken before reading, so two recovering processes
        // never both see (and claim) the same run
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let candidates: Vec<RunRecord> = {
            let mut stmt = tx.prepare(&format!(
                "SELECT {COLUMNS} FROM pipeline_run r
                 WHERE (?1 IS NULL OR pipeline = ?1)
                   AND (status = 'RUNNING'
                        OR (status = 'FAILED' AND decided_at_ms IS NOT NULL
                            AND EXISTS (SELECT 1 FROM commit_switch c WHERE c.run_id = r.id AND c.done_at_ms IS NULL)))
                 ORDER BY id"
            ))?;
            let rows = stmt.query_map(params![pipeline], read_run)?.collect::<rusqlite::Result<Vec<_>>>()?;
            rows
        };
        let now = now_ms();
        let here = host_name();
        let mut found = Vec::new();
        for mut r in candidates {
            let reason = if r.status == Status::Failed {
                format!("publish broke off: {}", r.error.as_deref().unwrap_or("no error recorded"))
            } else if r.host == here && !alive_here(&self.key, &r) {
                format!("crashed: process {} on {} is gone (found by {by})", r.pid, r.host)
            } else if r.decision.is_some() && r.host == here {
                // a decided run whose process is visibly alive here is publishing, however
                // late its heartbeat: completing it alongside could switch a dataset back
                continue;
            } else if now - r.heartbeat_at_ms > lease_ms {
                format!(
                    "crashed: no heartbeat for {} s (lease expired; found by {by})",
                    (now - r.heartbeat_at_ms) / 1000
                )
            } else {
                continue;
            };
            if r.decision.is_some() {
                // decided: claim it to complete its publish
                tx.execute(
                    "UPDATE pipeline_run SET status = 'RUNNING', pid = ?2, host = ?3, heartbeat_at_ms = ?4, error = ?5, proc_start = ?6 WHERE id = ?1",
                    params![r.id, std::process::id(), here, now, reason, own_process_start()],
                )?;
                own(&self.key, r.id);
                r.status = Status::Running;
                (r.pid, r.host, r.heartbeat_at_ms) = (std::process::id(), here.clone(), now);
            } else {
                tx.execute(
                    "UPDATE pipeline_run SET status = 'FAILED', finished_at_ms = ?2, error = ?3 WHERE id = ?1",
                    params![r.id, now, reason],
                )?;
                r.status = Status::Failed;
            }
            r.error = Some(reason);
            found.push(r);
        }
        let found = self.with_published(&tx, found)?;
        tx.commit()?;
        Ok(found)
    }

    fn complete_recovered(&self, id: i64, note: &str) -> Result<()> {
        disown(&self.key, id);
        self.conn().execute(
            "UPDATE pipeline_run SET status = 'SUCCESS', finished_at_ms = ?2, error = NULL, note = ?3 WHERE id = ?1",
            params![id, now_ms(), note],
        )?;
        Ok(())
    }

    fn runs(&self, filter: &RunFilter) -> Result<Vec<RunRecord>> {
        let conn = self.conn();
        let limit = if filter.limit == 0 { i64::MAX } else { filter.limit as i64 };
        let runs = {
            let mut stmt = conn.prepare(&format!(
                "SELECT {COLUMNS} FROM pipeline_run WHERE (?1 IS NULL OR pipeline = ?1) AND (?2 IS NULL OR status = ?2) ORDER BY id DESC LIMIT ?3"
            ))?;
            let rows = stmt
                .query_map(params![filter.pipeline, filter.status.map(|s| s.as_str()), limit], read_run)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            rows
        };
        self.with_published(&conn, runs)
    }

    fn run(&self, id: i64) -> Result<Option<RunRecord>> {
        let conn = self.conn();
        let run =
            conn.query_row(&format!("SELECT {COLUMNS} FROM pipeline_run WHERE id = ?1"), [id], read_run).optional()?;
        Ok(self.with_published(&conn, run.into_iter().collect())?.pop())
    }

    fn record_checks(
        &self,
        run_id: i64,
        partition: Option<&str>,
        results: &[crate::quality::CheckResult],
    ) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for r in results {
            tx.execute(
                "INSERT INTO data_quality_check (run_id, partition, dataset, check_name, severity, passed, observed, threshold, failing_rows, sample_json, metrics_json)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
                params![
                    run_id,
                    partition,
                    r.step,
                    r.check,
                    r.severity.as_str(),
                    r.passed,
                    r.observed,
                    r.threshold,
                    r.failing_rows as i64,
                    serde_json::to_string(&r.sample).unwrap_or_default(),
                    serde_json::to_string(&r.metrics).unwrap_or_default()
                ],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    fn check_results(&self, f: &CheckFilter) -> Result<Vec<StoredCheck>> {
        use crate::quality::{CheckResult, Severity};
        let conn = self.conn();
        let limit = if f.limit == 0 { i64::MAX } else { f.limit as i64 };
        let mut stmt = conn.prepare(
            "SELECT c.run_id, r.pipeline, c.partition, c.dataset, c.check_name, c.severity, c.passed, c.observed, c.threshold, c.failing_rows, c.sample_json, c.metrics_json
             FROM data_quality_check c JOIN pipeline_run r ON r.id = c.run_id
             WHERE (?1 IS NULL OR c.run_id = ?1) AND (?2 IS NULL OR r.pipeline = ?2) AND (?3 = 0 OR c.passed = 0)
             ORDER BY c.run_id DESC, c.rowid LIMIT ?4",
        )?;
        let rows = stmt
            .query_map(params![f.run_id, f.pipeline, f.failed_only, limit], |r| {
                let severity: String = r.get(5)?;
                let sample: String = r.get(10)?;
                Ok(StoredCheck {
                    run_id: r.get(0)?,
                    pipeline: r.get(1)?,
                    partition: r.get(2)?,
                    result: CheckResult {
                        step: r.get(3)?,
                        check: r.get(4)?,
                        severity: match severity.as_str() {
                            "warn" => Severity::Warn,
                            "quarantine" => Severity::Quarantine,
                            _ => Severity::Block,
                        },
                        passed: r.get(6)?,
                        observed: r.get(7)?,
                        threshold: r.get(8)?,
                        failing_rows: r.get::<_, i64>(9)? as u64,
                        sample: serde_json::from_str(&sample).unwrap_or_default(),
                        metrics: r
                            .get::<_, Option<String>>(11)?
                            .and_then(|m| serde_json::from_str(&m).ok())
                            .unwrap_or_default(),
                    },
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn metric_history(&self, pipeline: &str, step: &str, check: &str, limit: usize) -> Result<Vec<String>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT c.observed FROM data_quality_check c JOIN pipeline_run r ON r.id = c.run_id
             WHERE r.pipeline = ?1 AND r.status = 'SUCCESS' AND c.dataset = ?2 AND c.check_name = ?3
             ORDER BY c.run_id DESC LIMIT ?4",
        )?;
        let rows = stmt
            .query_map(params![pipeline, step, check, limit as i64], |r| r.get(0))?
            .collect::<rusqlite::Result<Vec<String>>>()?;
        Ok(rows)
    }

    fn watermarks(&self, pipeline: &str) -> Result<Vec<super::Watermark>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT source, value, run_id, updated_ms FROM watermark WHERE pipeline = ?1 ORDER BY source")?;
        let rows = stmt
            .query_map([pipeline], |r| {
                Ok(super::Watermark { source: r.get(0)?, value: r.get(1)?, run_id: r.get(2)?, updated_ms: r.get(3)? })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn set_watermark(&self, pipeline: &str, source: &str, value: Option<&str>, by: &str) -> Result<Option<String>> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let old: Option<String> = tx
            .query_row(
                "SELECT value FROM watermark WHERE pipeline = ?1 AND source = ?2",
                params![pipeline, source],
                |r| r.get(0),
            )
            .optional()?;
        match value {
            Some(v) => tx.execute(
                "INSERT INTO watermark (pipeline, source, value, run_id, updated_ms) VALUES (?1, ?2, ?3, 0, ?4)
                 ON CONFLICT (pipeline, source) DO UPDATE SET value = excluded.value, run_id = 0, updated_ms = excluded.updated_ms",
                params![pipeline, source, v, now_ms()],
            )?,
            None => tx.execute("DELETE FROM watermark WHERE pipeline = ?1 AND source = ?2", params![pipeline, source])?,
        };
        tx.execute(
            "INSERT INTO watermark_audit (pipeline, source, old_value, new_value, action, by_whom, at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![pipeline, source, old, value, if value.is_some() { "set" } else { "reset" }, by, now_ms()],
        )?;
        tx.commit()?;
        Ok(old)
    }

    fn watermark_audit(&self, pipeline: &str) -> Result<Vec<super::WatermarkChange>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT source, old_value, new_value, action, by_whom, at_ms FROM watermark_audit WHERE pipeline = ?1 ORDER BY id",
        )?;
        let rows = stmt
            .query_map([pipeline], |r| {
                Ok(super::WatermarkChange {
                    source: r.get(0)?,
                    old: r.get(1)?,
                    new: r.get(2)?,
                    action: r.get(3)?,
                    by: r.get(4)?,
                    at_ms: r.get(5)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn record_schema(&self, pipeline: &str, source: &str, v: &super::SchemaVersion) -> Result<()> {
        self.conn().execute(
            "INSERT OR IGNORE INTO source_schema (pipeline, source, fingerprint, columns_json, action, run_id, seen_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                pipeline,
                source,
                v.fingerprint,
                serde_json::to_string(&v.columns).unwrap_or_default(),
                v.action,
                v.run_id,
                v.seen_ms
            ],
        )?;
        Ok(())
    }

    fn schema_versions(&self, pipeline: &str, source: &str) -> Result<Vec<super::SchemaVersion>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT fingerprint, columns_json, action, run_id, seen_ms FROM source_schema WHERE pipeline = ?1 AND source = ?2 ORDER BY id",
        )?;
        let rows = stmt
            .query_map(params![pipeline, source], |r| {
                Ok(super::SchemaVersion {
                    fingerprint: r.get(0)?,
                    columns: serde_json::from_str(&r.get::<_, String>(1)?).unwrap_or_default(),
                    action: r.get(2)?,
                    run_id: r.get(3)?,
                    seen_ms: r.get(4)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    fn save_checkpoint(&self, run_id: i64, c: &Checkpoint) -> Result<()> {
        let mut w = weir_sdk::state::Writer::default();
        w.u64(c.states.len() as u64);
        for st in &c.states {
            match st {
                None => w.u64(0),
                Some(b) => {
                    w.u64(1);
                    w.bytes(b);
                }
            }
        }
        self.conn().execute(
            "INSERT OR REPLACE INTO checkpoint (run_id, step, data_json, states, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![run_id, c.step, serde_json::to_string(c).unwrap_or_default(), w.finish(), now_ms()],
        )?;
        Ok(())
    }

    fn checkpoints(&self, run_id: i64) -> Result<Vec<Checkpoint>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT data_json, states FROM checkpoint WHERE run_id = ?1 ORDER BY rowid")?;
        let rows = stmt
            .query_map([run_id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let mut out = Vec::new();
        for (json, states) in rows {
            let mut c: Checkpoint =
                serde_json::from_str(&json).map_err(|e| Error::Corrupt(format!("checkpoint of run #{run_id}: {e}")))?;
            let mut r = weir_sdk::state::Reader::new(&states);
            let bad = |e: weir_sdk::Error| Error::Corrupt(format!("checkpoint states of run #{run_id}: {e}"));
            for _ in 0..r.u64().map_err(bad)? {
                c.states.push(match r.u64().map_err(bad)? {
                    0 => None,
                    _ => Some(r.bytes().map_err(bad)?.to_vec()),
                });
            }
            out.push(c);
        }
        Ok(out)
    }

    fn create_backfill(&self, pipeline: &str, spec: &str, parallel: u32, partitions: &[String]) -> Result<i64> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        // the creating process holds the lease from the start: a reader between the insert
        // and the runner's first heartbeat must not take the backfill for an abandoned one
        let now = now_ms();
        tx.execute(
            "INSERT INTO backfill (pipeline, spec, parallel, status, created_at_ms, pid, host, heartbeat_at_ms)
             VALUES (?1, ?2, ?3, 'RUNNING', ?4, ?5, ?6, ?4)",
            params![pipeline, spec, parallel, now, std::process::id(), host_name()],
        )?;
        let id = tx.last_insert_rowid();
        for (i, p) in partitions.iter().enumerate() {
            tx.execute(
                "INSERT INTO backfill_partition (backfill_id, ord, partition, status) VALUES (?1, ?2, ?3, 'PENDING')",
                params![id, i as i64, p],
            )?;
        }
        tx.commit()?;
        Ok(id)
    }

    fn set_backfill_partition(
        &self,
        id: i64,
        partition: &str,
        status: &str,
        run_id: Option<i64>,
        error: Option<&str>,
    ) -> Result<()> {
        self.conn().execute(
            "UPDATE backfill_partition SET status = ?3, run_id = COALESCE(?4, run_id), error = ?5 WHERE backfill_id = ?1 AND partition = ?2",
            params![id, partition, status, run_id, error],
        )?;
        Ok(())
    }

    fn set_backfill_status(&self, id: i64, status: Status) -> Result<()> {
        let finished = if status == Status::Running { None } else { Some(now_ms()) };
        self.conn().execute(
            "UPDATE backfill SET status = ?2, finished_at_ms = ?3 WHERE id = ?1",
            params![id, status.as_str(), finished],
        )?;
        Ok(())
    }

    fn backfill_heartbeat(&self, id: i64) -> Result<()> {
        self.conn().execute(
            "UPDATE backfill SET pid = ?2, host = ?3, heartbeat_at_ms = ?4 WHERE id = ?1",
            params![id, std::process::id(), host_name(), now_ms()],
        )?;
        Ok(())
    }

    fn backfill(&self, id: i64) -> Result<Option<BackfillRecord>> {
        Ok(self.load_backfills("WHERE id = ?1", params![id])?.pop())
    }

    fn backfills(&self, pipeline: Option<&str>, limit: usize) -> Result<Vec<BackfillRecord>> {
        let limit = if limit == 0 { i64::MAX } else { limit as i64 };
        self.load_backfills("WHERE (?1 IS NULL OR pipeline = ?1) ORDER BY id DESC LIMIT ?2", params![pipeline, limit])
    }

    fn last_success(&self, pipeline: &str, partition: Option<&str>) -> Result<Option<RunRecord>> {
        let conn = self.conn();
        let run = conn
            .query_row(
                &format!("SELECT {COLUMNS} FROM pipeline_run WHERE pipeline = ?1 AND partition IS ?2 AND status = 'SUCCESS' ORDER BY id DESC LIMIT 1"),
                params![pipeline, partition],
                read_run,
            )
            .optional()?;
        Ok(self.with_published(&conn, run.into_iter().collect())?.pop())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn new_run(fp: &str) -> NewRun {
        NewRun {
            pipeline: "p".into(),
            partition: Some("2024-01-01".into()),
            config_sha256: "c".into(),
            plugins: [("mask".to_string(), "abc".to_string())].into(),
            fingerprint: fp.into(),
            staging: vec![PathBuf::from("/tmp/x.weir-staging-{run}")],
            backfill_id: None,
        }
    }

    #[test]
    fn run_lifecycle_and_queries() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s/state.db")).unwrap();
        let id = store.begin_run(&new_run("f1")).unwrap();
        let r = store.run(id).unwrap().unwrap();
        assert_eq!(r.status, Status::Running);
        assert_eq!(r.staging, [PathBuf::from(format!("/tmp/x.weir-staging-{id}"))]);
        let switch = PlannedSwitch {
            step: "s".into(),
            kind: "dataset".into(),
            staged: "/tmp/x.weir-staging-1".into(),
            target: "/o".into(),
            partition: None,
            replaces: false,
            token: "1:2".into(),
            target_token: None,
            done_at_ms: None,
        };
        store.record_decision(id, &[], std::slice::from_ref(&switch), &[]).unwrap();
        store
            .record_switch(
                id,
                0,
                &PublishEntry { step: "s".into(), path: "/o".into(), partition: None, action: "created".into() },
            )
            .unwrap();
        let d = store.run(id).unwrap().unwrap().decision.unwrap();
        assert_eq!((d.switches.len(), d.pending()), (1, 0));
        assert_eq!(d.switches[0].token, "1:2");
        let rows =
            [StepRows { step: "s".into(), rows_read: 10, rows_written: 9, rows_skipped: 1, rows_quarantined: 0 }];
        store.finish_run(id, Status::Success, &rows, None).unwrap();
        let r = store.last_success("p", Some("2024-01-01")).unwrap().unwrap();
        assert_eq!((r.id, r.steps[0].rows_written, r.published.len()), (id, 9, 1));
        assert!(store.last_success("p", None).unwrap().is_none());
        let id2 = store.begin_run(&new_run("f1")).unwrap();
        assert_eq!(store.run(id2).unwrap().unwrap().attempt, 2);
        // one live run per pipeline and partition; other partitions are free
        match store.begin_run(&new_run("f2")) {
            Err(Error::Busy { id, pid, .. }) => assert_eq!((id, pid), (id2, std::process::id())),
            other => panic!("expected Busy, got {other:?}"),
        }
        let other_partition =
            store.begin_run(&NewRun { partition: Some("2024-01-02".into()), ..new_run("f2") }).unwrap();
        store.finish_run(other_partition, Status::Success, &[], None).unwrap();
        store.finish_run(id2, Status::Failed, &[], Some("boom")).unwrap();
        let failed = store.runs(&RunFilter { status: Some(Status::Failed), ..Default::default() }).unwrap();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].error.as_deref(), Some("boom"));
        assert_eq!(store.runs(&RunFilter { limit: 1, ..Default::default() }).unwrap()[0].id, other_partition);
    }

    #[test]
    fn stale_runs_are_recovered_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("state.db")).unwrap();
        let id = store.begin_run(&new_run("f")).unwrap();
        // a live lease of this very process is not stale
        assert!(store.recover_stale(Some("p"), 60_000, "test").unwrap().is_empty());
        // an expired lease is
        store.conn().execute("UPDATE pipeline_run SET heartbeat_at_ms = 0 WHERE id = ?1", [id]).unwrap();
        let dead = store.recover_stale(Some("p"), 60_000, "test").unwrap();
        assert_eq!(dead.len(), 1);
        assert!(dead[0].error.as_deref().unwrap().contains("lease expired"));
        assert_eq!(store.run(id).unwrap().unwrap().status, Status::Failed);
        assert!(store.recover_stale(Some("p"), 60_000, "test").unwrap().is_empty());
        // a dead pid on this host is found at once
        let id = store.begin_run(&new_run("g")).unwrap();
        store.conn().execute("UPDATE pipeline_run SET pid = 999999999 WHERE id = ?1", [id]).unwrap();
        let dead = store.recover_stale(None, 60_000, "test").unwrap();
        assert!(dead[0].error.as_deref().unwrap().contains("is gone"), "{:?}", dead[0].error);
    }

    #[test]
    fn runs_of_two_stores_with_one_number_are_told_apart() {
        // `weir serve` runs pipelines of several stores in one process: run 1 of one store
        // ending must not make run 1 of the other look left behind
        let dir = tempfile::tempdir().unwrap();
        let a = SqliteStore::open(&dir.path().join("a.db")).unwrap();
        let b = SqliteStore::open(&dir.path().join("b.db")).unwrap();
        let (ia, ib) = (a.begin_run(&new_run("f")).unwrap(), b.begin_run(&new_run("f")).unwrap());
        assert_eq!(ia, ib);
        a.finish_run(ia, Status::Success, &[], None).unwrap();
        assert!(b.recover_stale(Some("p"), 60_000, "test").unwrap().is_empty(), "b's run is live");
        assert_eq!(b.run(ib).unwrap().unwrap().status, Status::Running);
        b.finish_run(ib, Status::Success, &[], None).unwrap();
    }

    #[test]
    fn a_decided_run_is_claimed_for_completion_once_and_keeps_its_rows() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("state.db")).unwrap();
        let id = store.begin_run(&new_run("f")).unwrap();
        let switches: Vec<PlannedSwitch> = (0..3)
            .map(|i| PlannedSwitch {
                step: "s".into(),
                kind: "partition".into(),
                staged: format!("/st/p{i}").into(),
                target: format!("/o/p{i}").into(),
                partition: Some(format!("p{i}")),
                replaces: i > 0,
                token: format!("9:{i}"),
                target_token: (i > 0).then(|| format!("8:{i}")),
                done_at_ms: None,
            })
            .collect();
        let rows = [StepRows { step: "s".into(), rows_read: 7, rows_written: 6, rows_skipped: 1, rows_quarantined: 2 }];
        store.record_decision(id, &rows, &switches, &[]).unwrap();
        let entry = PublishEntry { step: "s".into(), path: "/o/p0".into(), partition: None, action: "created".into() };
        store.record_switch(id, 0, &entry).unwrap();
        // the process died
        store.conn().execute("UPDATE pipeline_run SET pid = 999999999 WHERE id = ?1", [id]).unwrap();
        let found = store.recover_stale(Some("p"), 60_000, "test").unwrap();
        assert_eq!(found.len(), 1);
        let r = &found[0];
        assert_eq!((r.status, r.pid), (Status::Running, std::process::id()), "claimed, not failed");
        let d = r.decision.as_ref().unwrap();
        assert_eq!(d.pending(), 2);
        assert_eq!(d.switches[2].target, PathBuf::from("/o/p2"));
        assert_eq!(r.published.len(), 1);
        // claimed by this live process: nobody else takes it
        assert!(store.recover_stale(Some("p"), 60_000, "test").unwrap().is_empty());
        store.complete_recovered(id, "completed by recovery").unwrap();
        let r = store.run(id).unwrap().unwrap();
        assert_eq!(
            (r.status, r.note.as_deref(), r.error.as_deref()),
            (Status::Success, Some("completed by recovery"), None)
        );
        assert_eq!(r.steps, rows, "the rows recorded with the decision");

        // a decided run whose publish failed in-process is FAILED, then completed by recovery
        let id = store.begin_run(&new_run("g")).unwrap();
        store.record_decision(id, &rows, &switches[..1], &[]).unwrap();
        store.finish_run(id, Status::Failed, &[], Some("disk full")).unwrap();
        assert_eq!(store.run(id).unwrap().unwrap().steps, rows, "empty rows keep the decision's");
        // until it is completed, no run of the pipeline starts, whatever its partition
        match store.begin_run(&NewRun { partition: Some("another".into()), ..new_run("z") }) {
            Err(Error::Unfinished { id: unfinished }) => assert_eq!(unfinished, id),
            other => panic!("expected Unfinished, got {other:?}"),
        }
        let found = store.recover_stale(None, 60_000, "test").unwrap();
        assert_eq!(found.len(), 1);
        assert!(found[0].error.as_deref().unwrap().contains("disk full"));
        // an undecided FAILED run is history, not something to recover
        store.complete_recovered(id, "x").unwrap();
        let id = store.begin_run(&new_run("h")).unwrap();
        store.finish_run(id, Status::Failed, &[], Some("boom")).unwrap();
        assert!(store.recover_stale(None, 60_000, "test").unwrap().is_empty());
    }

    #[test]
    fn a_store_from_schema_version_1_gains_the_new_columns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        {
            let conn = Connection::open(&path).unwrap();
            // every column added since, taken out again
            let mut v1 = SCHEMA.to_string();
            for (from, to) in [
                (
                    "    backfill_id     INTEGER,\n    decided_at_ms   INTEGER,\n    note            TEXT,\n    proc_start      TEXT\n",
                    "    backfill_id     INTEGER\n",
                ),
                ("    sample_json TEXT,\n    metrics_json TEXT\n", "    sample_json TEXT\n"),
                ("    token      TEXT NOT NULL,\n    target_token TEXT,\n", "    token      TEXT NOT NULL,\n"),
                (
                    "    finished_at_ms INTEGER,\n    pid             INTEGER,\n    host            TEXT,\n    heartbeat_at_ms INTEGER\n",
                    "    finished_at_ms INTEGER\n",
                ),
            ] {
                assert!(v1.contains(from), "{from}");
                v1 = v1.replace(from, to);
            }
            conn.execute_batch(&v1).unwrap();
            conn.execute(
                "INSERT INTO pipeline_run (pipeline, status, started_at_ms, heartbeat_at_ms, pid, host, config_sha256, plugins_json, fingerprint)
                 VALUES ('p', 'SUCCESS', 1, 1, 1, 'h', 'c', '{}', 'f')",
                [],
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path).unwrap();
        let runs = store.runs(&RunFilter::default()).unwrap();
        assert_eq!((runs.len(), runs[0].note.clone(), runs[0].decision.is_none()), (1, None, true));
        assert!(store.check_results(&CheckFilter::default()).unwrap().is_empty(), "the checks table reads too");
        assert!(store.backfills(None, 0).unwrap().is_empty(), "and the backfills table");
        drop(store);
        SqliteStore::open(&path).unwrap(); // and opens again
    }

    #[test]
    fn watermarks_move_with_the_decision_and_by_hand_changes_are_audited() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("s.db")).unwrap();
        let id = store.begin_run(&new_run("f")).unwrap();
        assert!(store.watermarks("p").unwrap().is_empty());
        let w = crate::store::WatermarkUpdate {
            source: "ev".into(),
            start: None,
            end: "2026-01-01T00:00:00.000000Z".into(),
        };
        store.record_decision(id, &[], &[], std::slice::from_ref(&w)).unwrap();
        let marks = store.watermarks("p").unwrap();
        assert_eq!((marks[0].value.as_str(), marks[0].run_id), ("2026-01-01T00:00:00.000000Z", id));
        let run = store.run(id).unwrap().unwrap();
        assert_eq!((run.watermark_start, run.watermark_end.as_deref()), (None, Some("2026-01-01T00:00:00.000000Z")));
        assert_eq!(
            store.set_watermark("p", "ev", Some("x"), "me").unwrap().as_deref(),
            Some("2026-01-01T00:00:00.000000Z")
        );
        assert_eq!(store.set_watermark("p", "ev", None, "me").unwrap().as_deref(), Some("x"));
        assert!(store.watermarks("p").unwrap().is_empty());
        let audit = store.watermark_audit("p").unwrap();
        assert_eq!(audit.iter().map(|a| a.action.as_str()).collect::<Vec<_>>(), ["set", "reset"]);
    }
}
