//! Schema migrations, applied in order at start, in one transaction, and recorded in
//! `capstan_schema_migrations`. Replicas starting together do not race: on PostgreSQL the
//! transaction first takes an advisory lock (its `CREATE … IF NOT EXISTS` is not safe against
//! a concurrent creator); SQLite serialises writers itself. Statements are `IF NOT EXISTS`
//! anyway, so a migration interrupted halfway can run again.
//!
//! Columns added to an existing table (`ALTER TABLE … ADD COLUMN`) have no `IF NOT EXISTS` on
//! SQLite; they rely on the migration's transaction instead: both SQLite and PostgreSQL roll
//! back DDL with the transaction, so a migration is applied whole or not at all.
//!
//! A migration, once released, never changes: new tables, columns and indexes come as new
//! migrations at the end of [`MIGRATIONS`].

use sea_orm::sea_query::{
    Alias, ColumnDef, Index, OnConflict, Query, Table, TableAlterStatement, TableCreateStatement,
};
use sea_orm::{ConnectionTrait, DatabaseBackend, DatabaseConnection, DbErr, TransactionTrait};

/// Advisory lock key held while migrating ("capstan" in ASCII, as a number).
const MIGRATION_LOCK: i64 = 0x0063_6170_7374_616e;

/// One migration.
pub struct Migration {
    /// Its version, increasing.
    pub version: i64,
    /// What it does.
    pub name: &'static str,
    statements: fn() -> Vec<Step>,
}

enum Step {
    Table(Box<TableCreateStatement>),
    Index(Box<sea_orm::sea_query::IndexCreateStatement>),
    /// One column added to a table (SQLite takes one per statement).
    Column(Box<TableAlterStatement>),
}

fn a(name: &str) -> Alias {
    Alias::new(name)
}

fn col(name: &str) -> ColumnDef {
    ColumnDef::new(a(name))
}

fn initial() -> Vec<Step> {
    let jobs = Table::create()
        .table(a("jobs"))
        .if_not_exists()
        .col(col("id").string_len(26).not_null().primary_key())
        .col(col("name").string_len(256).null())
        .col(col("status").string_len(32).not_null())
        .col(col("attempt").integer().not_null())
        .col(col("node").string_len(64).null())
        .col(col("spec").text().not_null())
        .col(col("created_at").big_integer().not_null())
        .col(col("updated_at").big_integer().not_null())
        .col(col("dispatched_at").big_integer().null())
        .col(col("started_at").big_integer().null())
        .col(col("finished_at").big_integer().null())
        .col(col("exit_code").integer().null())
        .col(col("signal").integer().null())
        .col(col("error").text().null())
        .col(col("stdout_bytes").big_integer().null())
        .col(col("stderr_bytes").big_integer().null())
        .col(col("truncated").boolean().null())
        .col(col("last_seq").big_integer().not_null())
        .to_owned();
    let labels = Table::create()
        .table(a("job_labels"))
        .if_not_exists()
        .col(col("job_id").string_len(26).not_null())
        .col(col("key").string_len(64).not_null())
        .col(col("value").string_len(64).not_null())
        .col(col("status").string_len(32).not_null())
        .col(col("last_seq").big_integer().not_null())
        .primary_key(Index::create().col(a("job_id")).col(a("key")))
        .to_owned();
    let attempts = Table::create()
        .table(a("attempts"))
        .if_not_exists()
        .col(col("job_id").string_len(26).not_null())
        .col(col("attempt").integer().not_null())
        .col(col("node").string_len(64).null())
        .col(col("instance").string_len(26).null())
        .col(col("status").string_len(32).not_null())
        .col(col("dispatched_at").big_integer().null())
        .col(col("started_at").big_integer().null())
        .col(col("finished_at").big_integer().null())
        .col(col("exit_code").integer().null())
        .col(col("signal").integer().null())
        .col(col("error").text().null())
        .col(col("stdout_bytes").big_integer().null())
        .col(col("stderr_bytes").big_integer().null())
        .col(col("truncated").boolean().null())
        .col(col("last_seq").big_integer().not_null())
        .primary_key(Index::create().col(a("job_id")).col(a("attempt")))
        .to_owned();
    let events = Table::create()
        .table(a("events"))
        .if_not_exists()
        .col(col("seq").big_integer().not_null().primary_key())
        .col(col("job_id").string_len(26).not_null())
        .col(col("kind").string_len(32).not_null())
        .col(col("status").string_len(32).not_null())
        .col(col("attempt").integer().not_null())
        .col(col("node").string_len(64).null())
        .col(col("at").big_integer().not_null())
        .col(col("exit_code").integer().null())
        .col(col("error").text().null())
        .to_owned();
    vec![
        Step::Table(Box::new(jobs)),
        Step::Table(Box::new(labels)),
        Step::Table(Box::new(attempts)),
        Step::Table(Box::new(events)),
        // Lists are newest first (by id) within a filter: each filter column leads an index
        // that ends with the id, so a page is one index range scan.
        index("jobs_status_id", "jobs", &["status", "id"]),
        index("jobs_name_id", "jobs", &["name", "id"]),
        index("jobs_node_id", "jobs", &["node", "id"]),
        index(
            "job_labels_key_value",
            "job_labels",
            &["key", "value", "job_id"],
        ),
        index(
            "job_labels_key_value_status",
            "job_labels",
            &["key", "value", "status", "job_id"],
        ),
        index("events_job_seq", "events", &["job_id", "seq"]),
    ]
}

fn index(name: &str, table: &str, columns: &[&str]) -> Step {
    let mut index = Index::create();
    index.name(name).table(a(table)).if_not_exists();
    for column in columns {
        index.col(a(column));
    }
    Step::Index(Box::new(index.to_owned()))
}

fn add_column(table: &str, column: ColumnDef) -> Step {
    Step::Column(Box::new(
        Table::alter().table(a(table)).add_column(column).to_owned(),
    ))
}

/// Identity and audit: users, sessions and their refresh tokens, API tokens, the audit trail,
/// and who submitted each job.
fn identity() -> Vec<Step> {
    let users = Table::create()
        .table(a("users"))
        .if_not_exists()
        .col(col("name").string_len(64).not_null().primary_key())
        .col(col("role").string_len(32).not_null())
        .col(col("password_hash").text().not_null())
        .col(col("disabled").boolean().not_null())
        .col(col("created_at").big_integer().not_null())
        .col(col("updated_at").big_integer().not_null())
        .to_owned();
    let sessions = Table::create()
        .table(a("sessions"))
        .if_not_exists()
        .col(col("id").string_len(26).not_null().primary_key())
        .col(col("username").string_len(64).not_null())
        .col(col("created_at").big_integer().not_null())
        .col(col("revoked_at").big_integer().null())
        .col(col("revoked_reason").string_len(64).null())
        .to_owned();
    let refresh_tokens = Table::create()
        .table(a("refresh_tokens"))
        .if_not_exists()
        .col(col("secret_hash").string_len(64).not_null().primary_key())
        .col(col("session_id").string_len(26).not_null())
        .col(col("issued_at").big_integer().not_null())
        .col(col("expires_at").big_integer().not_null())
        .col(col("used_at").big_integer().null())
        .to_owned();
    let api_tokens = Table::create()
        .table(a("api_tokens"))
        .if_not_exists()
        .col(col("id").string_len(26).not_null().primary_key())
        .col(col("name").string_len(128).not_null())
        .col(col("role").string_len(32).not_null())
        .col(col("owner").string_len(64).not_null())
        .col(col("secret_hash").string_len(64).not_null().unique_key())
        .col(col("created_at").big_integer().not_null())
        .col(col("expires_at").big_integer().null())
        .col(col("revoked_at").big_integer().null())
        .to_owned();
    let audit = Table::create()
        .table(a("audit"))
        .if_not_exists()
        .col(col("id").string_len(26).not_null().primary_key())
        .col(col("at").big_integer().not_null())
        .col(col("principal").string_len(256).null())
        .col(col("via").string_len(16).null())
        .col(col("token").string_len(128).null())
        .col(col("action").string_len(64).not_null())
        .col(col("resource").string_len(256).null())
        .col(col("outcome").string_len(16).not_null())
        .col(col("status").integer().null())
        .col(col("client").string_len(64).null())
        .col(col("request_id").string_len(64).null())
        .col(col("trace_id").string_len(32).null())
        .col(col("detail").text().null())
        .to_owned();
    vec![
        Step::Table(Box::new(users)),
        Step::Table(Box::new(sessions)),
        Step::Table(Box::new(refresh_tokens)),
        Step::Table(Box::new(api_tokens)),
        Step::Table(Box::new(audit)),
        index("sessions_username", "sessions", &["username", "id"]),
        index("refresh_tokens_session", "refresh_tokens", &["session_id"]),
        index("api_tokens_owner_id", "api_tokens", &["owner", "id"]),
        // The audit trail lists newest first within a filter, like jobs.
        index("audit_principal_id", "audit", &["principal", "id"]),
        index("audit_action_id", "audit", &["action", "id"]),
        index("audit_resource_id", "audit", &["resource", "id"]),
        add_column(
            "jobs",
            col("submitted_by").string_len(256).null().to_owned(),
        ),
        add_column(
            "jobs",
            col("submitted_via").string_len(16).null().to_owned(),
        ),
        add_column(
            "jobs",
            col("submitted_token").string_len(128).null().to_owned(),
        ),
        index("jobs_submitted_by_id", "jobs", &["submitted_by", "id"]),
    ]
}

/// The schedule each job is a run of (`capstan.io/schedule` in its metadata), so that a
/// schedule's runs are listed through an index: the spec is stored as text, and reading JSON
/// inside it is spelled differently by SQLite and PostgreSQL.
fn schedule_runs() -> Vec<Step> {
    vec![
        add_column("jobs", col("schedule").string_len(64).null().to_owned()),
        index("jobs_schedule_id", "jobs", &["schedule", "id"]),
    ]
}

/// Every migration, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "jobs, labels, attempts, events",
        statements: initial,
    },
    Migration {
        version: 2,
        name: "users, sessions, tokens, audit, job submitters",
        statements: identity,
    },
    Migration {
        version: 3,
        name: "the schedule of each job",
        statements: schedule_runs,
    },
];

/// Applies the migrations not yet recorded. Safe to run from several processes at once (see
/// [`crate::History::connect`] for SQLite's busy database).
pub async fn run(db: &DatabaseConnection) -> Result<(), DbErr> {
    run_once(db).await
}

async fn run_once(db: &DatabaseConnection) -> Result<(), DbErr> {
    let txn = db.begin().await?;
    if db.get_database_backend() == DatabaseBackend::Postgres {
        txn.execute_unprepared(&format!("SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))
            .await?;
    }
    apply_pending(&txn).await?;
    txn.commit().await
}

async fn apply_pending(db: &impl ConnectionTrait) -> Result<(), DbErr> {
    let table = Table::create()
        .table(a("capstan_schema_migrations"))
        .if_not_exists()
        .col(col("version").big_integer().not_null().primary_key())
        .col(col("name").string_len(128).not_null())
        .to_owned();
    db.execute(&table).await?;
    let applied: Vec<i64> = {
        let query = Query::select()
            .column(a("version"))
            .from(a("capstan_schema_migrations"))
            .to_owned();
        db.query_all(&query)
            .await?
            .iter()
            .filter_map(|row| row.try_get::<i64>("", "version").ok())
            .collect()
    };
    for migration in MIGRATIONS {
        if applied.contains(&migration.version) {
            continue;
        }
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "applying migration"
        );
        for step in (migration.statements)() {
            match step {
                Step::Table(statement) => db.execute(statement.as_ref()).await?,
                Step::Index(statement) => db.execute(statement.as_ref()).await?,
                Step::Column(statement) => db.execute(statement.as_ref()).await?,
            };
        }
        let record = Query::insert()
            .into_table(a("capstan_schema_migrations"))
            .columns([a("version"), a("name")])
            .values_panic([migration.version.into(), migration.name.into()])
            .on_conflict(OnConflict::column(a("version")).do_nothing().to_owned())
            .to_owned();
        db.execute(&record).await?;
    }
    Ok(())
}
