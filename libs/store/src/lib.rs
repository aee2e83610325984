//! Capstan's job history in SQL: the schema and its migrations, the projection of job events
//! into it, and the queries the API serves from it; beside it, the API's identity tables
//! (users, sessions, refresh and API tokens) and the audit trail. SQLite by default, PostgreSQL
//! when given a `postgres://` URL; sea-orm entities and SQL stay inside this crate.

pub mod audit;
pub mod entity;
pub mod identity;
pub mod migrate;
pub mod projection;
pub mod purge;
pub mod query;
#[cfg(feature = "testing")]
pub mod testing;

use std::time::Duration;

use capstan_protocol::{JobId, JobStatus};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbErr};

pub use audit::AuditQuery;
pub use identity::{Rotation, UserChanges};
pub use projection::Sequenced;
pub use query::JobQuery;

/// A history database failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database could not be reached or refused the statement: retry later.
    #[error("history database unavailable: {0}")]
    Unavailable(#[from] DbErr),
    /// The URL names no supported database.
    #[error("unsupported database URL `{0}`: use sqlite:// or postgres://")]
    UnsupportedUrl(String),
}

/// The history database.
#[derive(Debug, Clone)]
pub struct History {
    db: DatabaseConnection,
}

impl History {
    /// Connects to `url` (`sqlite://path?mode=rwc` or `postgres://…`) and applies migrations.
    /// A SQLite file is created if missing and used in WAL mode, so readers never wait for
    /// the projection's writes.
    ///
    /// SQLite answers "database is locked" without waiting in a few cases: while another
    /// process switches a new file to WAL, or when a transaction that read wants to write after
    /// another wrote. Connecting and migrating are idempotent, so a replica that meets a busy
    /// database tries again, for up to ten seconds.
    pub async fn connect(url: &str) -> Result<Self, Error> {
        let mut attempt: u64 = 0;
        loop {
            match Self::connect_once(url).await {
                Err(Error::Unavailable(error)) if attempt < 40 && is_busy(&error) => {
                    attempt += 1;
                    tracing::debug!(attempt, "history database busy, connecting again");
                    tokio::time::sleep(Duration::from_millis(25 * attempt.min(10))).await;
                }
                result => return result,
            }
        }
    }

    async fn connect_once(url: &str) -> Result<Self, Error> {
        let sqlite = url.starts_with("sqlite:");
        if !sqlite && !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
            return Err(Error::UnsupportedUrl(redact(url)));
        }
        let mut options = ConnectOptions::new(url.to_owned());
        options
            .sqlx_logging(false)
            .connect_timeout(Duration::from_secs(10))
            .acquire_timeout(Duration::from_secs(10))
            .max_connections(if sqlite { 4 } else { 10 });
        if sqlite {
            options.map_sqlx_sqlite_opts(|opts| {
                opts.create_if_missing(true)
                    .journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                    .synchronous(sea_orm::sqlx::sqlite::SqliteSynchronous::Normal)
                    .busy_timeout(Duration::from_secs(10))
                    // A 64 MiB page cache and memory-mapped reads: the projection's upserts
                    // touch index pages all over the file, and reading them through the
                    // kernel's page cache with pread was most of its cost.
                    .pragma("cache_size", "-65536")
                    .pragma("mmap_size", "268435456")
                    .pragma("temp_store", "memory")
            });
        }
        let db = Database::connect(options).await?;
        migrate::run(&db).await?;
        Ok(Self { db })
    }

    /// The connection, for the projection and tests.
    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Checks the database answers.
    pub async fn ping(&self) -> Result<(), Error> {
        self.db.ping().await?;
        Ok(())
    }

    /// Applies a batch of events (see [`projection`]).
    pub async fn apply(&self, batch: &[Sequenced]) -> Result<(), Error> {
        projection::apply(&self.db, batch).await?;
        Ok(())
    }

    /// A page of jobs.
    pub async fn list(&self, query: &JobQuery) -> Result<Vec<entity::job::Model>, Error> {
        Ok(query::list(&self.db, query).await?)
    }

    /// One job.
    pub async fn get(&self, id: JobId) -> Result<Option<entity::job::Model>, Error> {
        Ok(query::get(&self.db, id).await?)
    }

    /// A job's attempts.
    pub async fn attempts(&self, id: JobId) -> Result<Vec<entity::attempt::Model>, Error> {
        Ok(query::attempts(&self.db, id).await?)
    }

    /// A job's events.
    pub async fn events(&self, id: JobId) -> Result<Vec<entity::event::Model>, Error> {
        Ok(query::events(&self.db, id).await?)
    }

    /// Jobs per status; statuses without jobs are reported as zero, and rows whose status
    /// this version cannot read (a newer version wrote them) are counted apart, not dropped.
    pub async fn status_counts(&self) -> Result<StatusCounts, Error> {
        let counts = query::status_counts(&self.db).await?;
        Ok(StatusCounts::of_rows(&counts))
    }

    /// The identity tables (users, sessions, tokens), through [`identity`]'s functions.
    pub fn identity(&self) -> &DatabaseConnection {
        &self.db
    }

    /// Writes audit records, skipping those already written.
    pub async fn record_audit(
        &self,
        records: &[capstan_protocol::AuditRecord],
    ) -> Result<(), Error> {
        Ok(audit::insert(&self.db, records).await?)
    }

    /// A page of audit records.
    pub async fn audit(&self, query: &AuditQuery) -> Result<Vec<entity::audit::Model>, Error> {
        Ok(audit::list(&self.db, query).await?)
    }

    /// At most `limit` ids (after `after`, in id order) of finished jobs in `statuses` that
    /// ended before `finished_before`.
    pub async fn purgeable(
        &self,
        statuses: &[JobStatus],
        finished_before: capstan_protocol::Timestamp,
        after: Option<&str>,
        limit: u64,
    ) -> Result<Vec<String>, Error> {
        Ok(purge::finished(
            &self.db,
            statuses,
            finished_before.as_millis(),
            after,
            limit,
        )
        .await?)
    }

    /// Deletes the history rows of the jobs `ids`; how many jobs were deleted.
    pub async fn delete_jobs(&self, ids: &[String]) -> Result<u64, Error> {
        Ok(purge::delete(&self.db, ids).await?)
    }

    /// Deletes every row of every history table (before a rebuild). Users, tokens and the
    /// audit trail are not history and stay.
    pub async fn clear(&self) -> Result<(), Error> {
        for table in ["events", "attempts", "job_labels", "jobs"] {
            self.db
                .execute_unprepared(&format!("DELETE FROM {table}"))
                .await?;
        }
        Ok(())
    }
}

fn is_busy(error: &DbErr) -> bool {
    let text = error.to_string();
    text.contains("database is locked")
        || text.contains("(code: 5)")
        || text.contains("(code: 517)")
}

/// A database URL with its password hidden, for messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// How many jobs the history holds in each status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusCounts {
    /// Every status this version knows, in [`JobStatus::ALL`]'s order, zero included.
    pub known: Vec<(JobStatus, i64)>,
    /// Rows whose status this version cannot read.
    pub unknown: i64,
}

impl StatusCounts {
    /// Counts from `(status as stored, count)` rows.
    fn of_rows(rows: &[(String, i64)]) -> Self {
        let known = JobStatus::ALL
            .iter()
            .map(|status| {
                let count = rows
                    .iter()
                    .filter(|(name, _)| name == status.as_str())
                    .map(|(_, count)| *count)
                    .sum();
                (*status, count)
            })
            .collect();
        let unknown = rows
            .iter()
            .filter(|(name, _)| name.parse::<JobStatus>().is_err())
            .map(|(_, count)| *count)
            .sum();
        Self { known, unknown }
    }

    /// Jobs in `status`.
    pub fn of(&self, status: JobStatus) -> i64 {
        self.known
            .iter()
            .find(|(known, _)| *known == status)
            .map_or(0, |(_, count)| *count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_this_version_cannot_read_is_counted_apart_not_dropped_or_taken_for_failed() {
        let rows = [
            ("succeeded".to_owned(), 5),
            ("failed".to_owned(), 2),
            ("paused".to_owned(), 3),
            ("archived".to_owned(), 1),
        ];
        let counts = StatusCounts::of_rows(&rows);
        assert_eq!(counts.of(JobStatus::Succeeded), 5);
        assert_eq!(counts.of(JobStatus::Failed), 2);
        assert_eq!(counts.of(JobStatus::Running), 0);
        assert_eq!(counts.unknown, 4);
        assert_eq!(counts.known.len(), JobStatus::ALL.len());
    }

    #[test]
    fn passwords_are_hidden_in_database_urls() {
        assert_eq!(
            redact("postgres://capstan:s3cret@db:5432/capstan"),
            "postgres://capstan:***@db:5432/capstan"
        );
        assert_eq!(redact("sqlite://capstan.db"), "sqlite://capstan.db");
        assert_eq!(redact("postgres://capstan@db/x"), "postgres://capstan@db/x");
    }
}
