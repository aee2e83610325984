//! Databases for tests: a fresh SQLite file, or a fresh database on the PostgreSQL server named
//! by `CAPSTAN_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`, which
//! `cargo xtask test` makes sure is running). A PostgreSQL test never skips: an unreachable
//! server fails it with the reason.

use sea_orm::{ConnectionTrait, Database};

/// A database that exists for one test.
pub struct TestDatabase {
    url: String,
    cleanup: Cleanup,
}

enum Cleanup {
    File(#[allow(dead_code)] tempfile::TempDir),
    Postgres { admin: String, name: String },
}

impl TestDatabase {
    /// The database's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A fresh SQLite file.
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("history.db").display()
        );
        Self {
            url,
            cleanup: Cleanup::File(dir),
        }
    }

    /// A fresh database on the test PostgreSQL server.
    pub async fn postgres() -> Self {
        let admin = std::env::var("CAPSTAN_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
        let name = format!(
            "capstan_test_{}",
            ulid::Ulid::generate().to_string().to_lowercase()
        );
        let server = Database::connect(admin.as_str()).await.unwrap_or_else(|e| {
            panic!(
                "PostgreSQL at {} is not reachable ({e}); start it, or run the tests with \
                 `cargo xtask test`, which does",
                crate::redact(&admin)
            )
        });
        server
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create the test database");
        let base = admin
            .rsplit_once('/')
            .map_or(admin.as_str(), |(base, _)| base);
        Self {
            url: format!("{base}/{name}"),
            cleanup: Cleanup::Postgres { admin, name },
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Cleanup::Postgres { admin, name } = &self.cleanup {
            let (admin, name) = (admin.clone(), name.clone());
            // Drop runs outside async; a short-lived runtime on its own thread does the work.
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime");
                runtime.block_on(async {
                    if let Ok(server) = Database::connect(admin.as_str()).await {
                        let _ = server
                            .execute_unprepared(&format!(
                                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                            ))
                            .await;
                    }
                });
            })
            .join();
        }
    }
}

/// Defines a module `$name` with two tests running `$body` (an async closure taking the
/// database URL): one on a fresh SQLite file, one on a fresh PostgreSQL database.
#[macro_export]
macro_rules! on_both_backends {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;

            #[tokio::test]
            async fn on_sqlite() {
                let db = $crate::testing::TestDatabase::sqlite();
                ($body)(db.url().to_owned()).await;
            }

            #[tokio::test]
            async fn on_postgres() {
                let db = $crate::testing::TestDatabase::postgres().await;
                ($body)(db.url().to_owned()).await;
            }
        }
    };
}
