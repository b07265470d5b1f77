//! Databases for tests. Every Postgres test gets a database of its own, created on the
//! server named by `HERALD_TEST_DATABASE_URL` and dropped when the test ends.

use std::time::Duration;

use sqlx::{AnyPool, Executor};

/// The server tests create their databases on. `scripts/test.sh` installs and starts a
/// Postgres server when none is reachable and exports this variable.
pub const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

pub fn admin_url() -> String {
    std::env::var("HERALD_TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_string())
}

/// A database that exists for the life of this value.
pub struct TestDb {
    pub url: String,
    kind: Kind,
}

enum Kind {
    Postgres { admin: String, name: String },
    Sqlite { _dir: tempfile::TempDir },
}

impl TestDb {
    /// A fresh, empty Postgres database. Panics with instructions when no server answers:
    /// a test that needs Postgres must fail loudly, never skip.
    pub async fn postgres() -> Self {
        sqlx::any::install_default_drivers();
        let admin = admin_url();
        let pool = match AnyPool::connect(&admin).await {
            Ok(pool) => pool,
            Err(e) => panic!(
                "cannot reach Postgres at {admin} ({e}). Run the tests through scripts/test.sh, which installs and starts \
                 Postgres, or point HERALD_TEST_DATABASE_URL at a server where this user may create databases."
            ),
        };
        let name = format!("herald_test_{:016x}", rand::random::<u64>());
        pool.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name} on {admin}: {e}"));
        pool.close().await;
        let url = match admin.rsplit_once('/') {
            Some((server, _)) => format!("{server}/{name}"),
            None => panic!("HERALD_TEST_DATABASE_URL {admin:?} has no database part"),
        };
        Self {
            url,
            kind: Kind::Postgres { admin, name },
        }
    }

    /// A fresh SQLite file in a temporary directory.
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("herald-ipam.db").display()
        );
        Self {
            url,
            kind: Kind::Sqlite { _dir: dir },
        }
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self.kind, Kind::Postgres { .. })
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Kind::Postgres { admin, name } = &self.kind else {
            return;
        };
        let (admin, name) = (admin.clone(), name.clone());
        // Drop runs inside the test's runtime, which cannot be blocked on; a thread with a
        // small runtime of its own does the clean-up, bounded in time.
        let handle = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let drop_db = async {
                    let pool = AnyPool::connect(&admin).await.ok()?;
                    pool.execute(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .await
                    .ok()?;
                    pool.close().await;
                    Some(())
                };
                let _ = tokio::time::timeout(Duration::from_secs(10), drop_db).await;
            });
        });
        let _ = handle.join();
    }
}
