//! The first administrator: on a database with no user, the API creates `admin` with the
//! password of `CAPSTAN_ADMIN_PASSWORD`, or with a generated one that it logs once. There is no
//! fixed default password. Replicas starting together on an empty database race to insert the
//! same user; exactly one wins, and only the winner logs a generated password.

use capstan_protocol::{AuditAction, AuditOutcome, AuditRecord, AuthMethod, Timestamp};
use capstan_store::History;
use capstan_store::entity::user;
use capstan_store::identity;

use crate::Error;
use crate::audit::Auditor;
use crate::auth::Role;
use crate::auth::password::{self, check_password};
use crate::auth::secret::{Secret, new_password};

/// The first administrator's name.
pub const ADMIN: &str = "admin";

/// Creates the first administrator if there is no user yet.
pub(crate) async fn first_admin(
    history: &History,
    auditor: &Auditor,
    configured: Option<&Secret>,
    min_length: usize,
) -> Result<(), Error> {
    let db = history.identity();
    if !identity::no_users(db)
        .await
        .map_err(capstan_store::Error::from)?
    {
        return Ok(());
    }
    let (password, generated) = match configured {
        Some(secret) => {
            check_password(secret.expose(), min_length)
                .map_err(|e| Error::Config(format!("CAPSTAN_ADMIN_PASSWORD: {e}")))?;
            (secret.expose().to_owned(), false)
        }
        None => (new_password(), true),
    };
    let now = Timestamp::now().as_millis();
    let created = identity::create_user(
        db,
        user::Model {
            name: ADMIN.to_owned(),
            role: Role::Admin.as_str().to_owned(),
            password_hash: password::hash(password.clone()).await,
            disabled: false,
            created_at: now,
            updated_at: now,
        },
    )
    .await
    .map_err(capstan_store::Error::from)?;
    if !created {
        return Ok(());
    }
    let mut record = AuditRecord::new(AuditAction::UserBootstrap, AuditOutcome::Success);
    record.principal = Some(ADMIN.to_owned());
    record.via = Some(AuthMethod::Password);
    record.resource = Some(format!("user/{ADMIN}"));
    record.detail = Some(
        if generated {
            "first administrator, with a generated password"
        } else {
            "first administrator, with CAPSTAN_ADMIN_PASSWORD"
        }
        .to_owned(),
    );
    // The API does not serve before this is recorded: a first administrator must be in the
    // audit trail like any other user.
    let mut delay = std::time::Duration::from_millis(100);
    for attempt in 1.. {
        match auditor.record(&record).await {
            Ok(()) => break,
            Err(error) if attempt < 20 => {
                tracing::warn!(error = %error, attempt, "cannot record the first administrator's creation yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(5));
            }
            Err(error) => return Err(Error::Mesh(error)),
        }
    }
    if generated {
        // NOTE: the one place a secret is logged, on purpose and once: without it nobody
        // could log in. Change it with POST /api/v1/users/me/password.
        tracing::warn!(
            user = ADMIN,
            password = %password,
            "created the first administrator with a generated password (shown only now): \
             log in and change it, or set CAPSTAN_ADMIN_PASSWORD before the first start"
        );
    } else {
        tracing::info!(
            user = ADMIN,
            "created the first administrator with CAPSTAN_ADMIN_PASSWORD"
        );
    }
    Ok(())
}
