//! The identity, audit and purge tables on both backends: the single use of a refresh token
//! under concurrency, users created once by racing replicas, audit records written twice kept
//! once, and the purge's batches.

use capstan_protocol::job::Outcome;
use capstan_protocol::{
    AuditAction, AuditOutcome, AuditRecord, AuthMethod, JobEvent, JobEventKind, JobId, JobRecord,
    JobSpec, JobStatus, NodeId, OutputSummary, SubmittedBy, Timestamp,
};
use capstan_store::entity::user;
use capstan_store::identity::{self, Rotation};
use capstan_store::{AuditQuery, History, JobQuery, Sequenced};

use capstan_store::on_both_backends;

fn person(name: &str) -> user::Model {
    user::Model {
        name: name.to_owned(),
        role: "operator".into(),
        password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(),
        disabled: false,
        created_at: 1,
        updated_at: 1,
    }
}

on_both_backends!(
    a_refresh_token_presented_twice_at_once_rotates_once_and_ends_the_session,
    |url: String| async move {
        let history = History::connect(&url).await.expect("connects");
        let db = history.identity();
        identity::start_session(db, "s1", "alice", "r1", 1_000, 100_000)
            .await
            .expect("a session");
        let (a, b) = tokio::join!(
            identity::rotate_refresh(db, "r1", "r2a", 2_000, 100_000),
            identity::rotate_refresh(db, "r1", "r2b", 2_000, 100_000),
        );
        let outcomes = [a.expect("answers"), b.expect("answers")];
        let rotated = outcomes
            .iter()
            .filter(|o| matches!(o, Rotation::Rotated { .. }))
            .count();
        let reused = outcomes
            .iter()
            .filter(|o| matches!(o, Rotation::Reused { .. }))
            .count();
        assert_eq!((rotated, reused), (1, 1), "{outcomes:?}");
        // The session is over: even the token the winner got is refused.
        for token in ["r2a", "r2b"] {
            let next = identity::rotate_refresh(db, token, "r3", 3_000, 100_000)
                .await
                .expect("answers");
            assert!(
                matches!(next, Rotation::Revoked | Rotation::Unknown),
                "{token}: {next:?}"
            );
        }
        assert_eq!(
            identity::rotate_refresh(db, "never-issued", "x", 3_000, 100_000)
                .await
                .expect("answers"),
            Rotation::Unknown
        );
        identity::start_session(db, "s2", "alice", "old", 1_000, 1_500)
            .await
            .expect("a session");
        assert_eq!(
            identity::rotate_refresh(db, "old", "new", 2_000, 100_000)
                .await
                .expect("answers"),
            Rotation::Expired
        );
        // Housekeeping forgets expired tokens and the sessions they leave empty.
        let (tokens, sessions) = identity::forget_expired(db, 50_000).await.expect("deletes");
        assert_eq!((tokens, sessions), (1, 1), "the token of s2, then s2");
        assert!(
            identity::session_of_refresh(db, "r2a")
                .await
                .expect("reads")
                .is_some(),
            "unexpired tokens and their sessions stay"
        );
    }
);

on_both_backends!(
    racing_replicas_create_a_user_once_and_revocations_reach_every_session_and_token,
    |url: String| async move {
        let history = History::connect(&url).await.expect("connects");
        let db = history.identity();
        assert!(identity::no_users(db).await.expect("counts"));
        let (a, b) = tokio::join!(
            identity::create_user(db, person("admin")),
            identity::create_user(db, person("admin")),
        );
        assert_eq!(
            [a.expect("inserts"), b.expect("inserts")]
                .iter()
                .filter(|c| **c)
                .count(),
            1
        );
        for (id, refresh) in [("s1", "r1"), ("s2", "r2")] {
            identity::start_session(db, id, "admin", refresh, 1, 100_000)
                .await
                .expect("a session");
        }
        let mut revoked = identity::revoke_sessions_of(db, "admin", "user.update", 5)
            .await
            .expect("revokes");
        revoked.sort();
        assert_eq!(revoked, ["s1", "s2"]);
        assert_eq!(
            identity::rotate_refresh(db, "r1", "r3", 6, 100_000)
                .await
                .expect("answers"),
            Rotation::Revoked
        );
        let token = capstan_store::entity::api_token::Model {
            id: "t1".into(),
            name: "ci".into(),
            role: "operator".into(),
            owner: "admin".into(),
            secret_hash: "d1".into(),
            created_at: 1,
            expires_at: None,
            revoked_at: None,
        };
        identity::create_token(db, token).await.expect("stored");
        let (found, owner) = identity::token_by_secret(db, "d1")
            .await
            .expect("reads")
            .expect("found");
        assert_eq!(
            (found.id.as_str(), owner.map(|o| o.name)),
            ("t1", Some("admin".into()))
        );
        assert_eq!(
            identity::revoke_tokens_of(db, "admin", 7)
                .await
                .expect("revokes"),
            ["t1"]
        );
        assert!(!identity::revoke_token(db, "t1", 8).await.expect("answers"));
    }
);

fn record(action: AuditAction, principal: &str) -> AuditRecord {
    let mut record = AuditRecord::new(action, AuditOutcome::Success);
    record.principal = Some(principal.to_owned());
    record.via = Some(AuthMethod::Password);
    record.resource = Some(format!("user/{principal}"));
    record
}

on_both_backends!(
    audit_records_written_twice_are_kept_once_and_listed_newest_first_by_filter,
    |url: String| async move {
        let history = History::connect(&url).await.expect("connects");
        let records: Vec<AuditRecord> = (0..5)
            .map(|n| {
                record(
                    if n % 2 == 0 {
                        AuditAction::UserCreate
                    } else {
                        AuditAction::AuthLogin
                    },
                    if n < 3 { "alice" } else { "bob" },
                )
            })
            .collect();
        // Whatever a client sent, however long, the record is stored (cut to its columns).
        let mut hostile = record(AuditAction::HttpRequest, &"p".repeat(5_000));
        hostile.resource = Some(format!("POST /{}", "a".repeat(10_000)));
        hostile.client = Some("c".repeat(500));
        hostile.detail = Some("d".repeat(100_000));
        history
            .record_audit(&[hostile.clone()])
            .await
            .expect("a hostile record is stored");
        let stored = history
            .audit(&AuditQuery {
                action: Some("http.request".into()),
                limit: 10,
                ..Default::default()
            })
            .await
            .expect("lists");
        assert_eq!(stored[0].resource.as_deref().map(str::len), Some(256));
        assert_eq!(stored[0].principal.as_deref().map(str::len), Some(256));
        history.record_audit(&records).await.expect("written");
        // The projection writes the same records again.
        history.record_audit(&records).await.expect("written again");
        let all = history
            .audit(&AuditQuery {
                limit: 100,
                ..Default::default()
            })
            .await
            .expect("lists");
        assert_eq!(all.len(), 6, "five records and the hostile one, each once");
        let ids: Vec<&str> = all.iter().map(|r| r.id.as_str()).collect();
        let mut sorted = ids.clone();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        assert_eq!(ids, sorted, "newest first");
        let alice_logins = history
            .audit(&AuditQuery {
                principal: Some("alice".into()),
                action: Some("auth.login".into()),
                limit: 100,
                ..Default::default()
            })
            .await
            .expect("lists");
        assert_eq!(alice_logins.len(), 1);
        let page = history
            .audit(&AuditQuery {
                before: Some(records[3].id),
                limit: 100,
                ..Default::default()
            })
            .await
            .expect("lists");
        assert_eq!(page.len(), 3, "the records older than the cursor");
    }
);

/// The events of a job that ended `status` at `finished` (milliseconds).
fn ended(status: JobStatus, finished: i64, seq: u64) -> (JobId, Vec<Sequenced>) {
    let id = JobId::generate();
    let mut record = JobRecord::new(id, JobSpec::shell("true"), Timestamp::from_millis(0));
    record.submitted_by = Some(SubmittedBy {
        principal: "alice".into(),
        via: AuthMethod::Token,
        token: Some("ci".into()),
    });
    let assigned = record.assigned(NodeId::new("n1").expect("valid"), Timestamp::from_millis(0));
    let mut events = vec![Sequenced {
        seq,
        event: JobEvent::new(JobEventKind::Pending, &assigned),
    }];
    if status.is_terminal() {
        let done = assigned.finished(
            &Outcome {
                status,
                exit_code: Some(0),
                signal: None,
                error: None,
                output: OutputSummary::default(),
            },
            Timestamp::from_millis(finished),
        );
        let kind = match status {
            JobStatus::Succeeded => JobEventKind::Succeeded,
            _ => JobEventKind::Failed,
        };
        events.push(Sequenced {
            seq: seq + 1,
            event: JobEvent::new(kind, &done),
        });
    }
    (id, events)
}

on_both_backends!(
    the_purge_finds_finished_jobs_in_batches_and_deletes_every_row_of_them,
    |url: String| async move {
        let history = History::connect(&url).await.expect("connects");
        let mut old = Vec::new();
        let mut seq = 1;
        for n in 0..5 {
            let (id, events) = ended(JobStatus::Succeeded, 1_000 + n, seq);
            seq += 2;
            history.apply(&events).await.expect("applied");
            old.push(id.to_string());
        }
        let (failed, events) = ended(JobStatus::Failed, 1_500, seq);
        history.apply(&events).await.expect("applied");
        let (recent, events) = ended(JobStatus::Succeeded, 9_000, seq + 2);
        history.apply(&events).await.expect("applied");
        let (pending, events) = ended(JobStatus::Pending, 0, seq + 4);
        history.apply(&events).await.expect("applied");

        let by_alice = history
            .list(&JobQuery {
                submitted_by: Some("alice".into()),
                limit: 100,
                ..Default::default()
            })
            .await
            .expect("lists");
        assert_eq!(by_alice.len(), 8);
        assert_eq!(by_alice[0].submitted_via.as_deref(), Some("token"));
        assert_eq!(by_alice[0].submitted_token.as_deref(), Some("ci"));

        let before = Timestamp::from_millis(5_000);
        let succeeded = [JobStatus::Succeeded];
        let first = history
            .purgeable(&succeeded, before, None, 3)
            .await
            .expect("finds");
        assert_eq!(first, old[..3]);
        let second = history
            .purgeable(&succeeded, before, first.last().map(String::as_str), 3)
            .await
            .expect("finds");
        assert_eq!(second, old[3..]);
        assert_eq!(history.delete_jobs(&old).await.expect("deletes"), 5);
        let finished: Vec<JobStatus> = JobStatus::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .collect();
        let left = history
            .purgeable(&finished, before, None, 100)
            .await
            .expect("finds");
        assert_eq!(left, [failed.to_string()]);
        for id in &old {
            let id: JobId = id.parse().expect("an id");
            assert!(history.get(id).await.expect("reads").is_none());
            assert!(history.events(id).await.expect("reads").is_empty());
            assert!(history.attempts(id).await.expect("reads").is_empty());
        }
        assert!(history.get(recent).await.expect("reads").is_some());
        assert!(history.get(pending).await.expect("reads").is_some());
    }
);

on_both_backends!(
    two_administrators_demoting_each_other_at_once_leave_one_of_them_an_administrator,
    |url: String| async move {
        let history = History::connect(&url).await.expect("connects");
        let db = history.identity();
        for name in ["a", "b"] {
            let mut admin = person(name);
            admin.role = "admin".into();
            assert!(identity::create_user(db, admin).await.expect("inserts"));
        }
        let demote = |name: &'static str| async move {
            identity::change_keeping_an_admin(
                db,
                name,
                Some(identity::UserChanges {
                    role: Some("viewer".into()),
                    ..Default::default()
                }),
                "admin",
                5,
            )
            .await
        };
        // At once: whichever order the database puts them in, one is refused.
        let (first, second) = tokio::join!(demote("a"), demote("b"));
        let outcomes = [first, second];
        let refused = outcomes
            .iter()
            .filter(|o| matches!(o, Ok(identity::Kept::LastAdmin)))
            .count();
        let done = outcomes
            .iter()
            .filter(|o| matches!(o, Ok(identity::Kept::Done(Some(_)))))
            .count();
        // SQLite may answer the loser "busy" rather than wait: that refuses it too.
        assert_eq!(done, 1, "{outcomes:?}");
        assert_eq!(refused + outcomes.iter().filter(|o| o.is_err()).count(), 1);
        let admins = identity::users(db)
            .await
            .expect("lists")
            .into_iter()
            .filter(|u| u.role == "admin")
            .count();
        assert_eq!(admins, 1);
        // Deleting the last one is refused too; deleting a viewer is not.
        let last = if outcomes[0]
            .as_ref()
            .is_ok_and(|o| matches!(o, identity::Kept::LastAdmin))
        {
            "a"
        } else {
            "b"
        };
        assert_eq!(
            identity::change_keeping_an_admin(db, last, None, "admin", 6)
                .await
                .expect("answers"),
            identity::Kept::LastAdmin
        );
        let viewer = if last == "a" { "b" } else { "a" };
        assert_eq!(
            identity::change_keeping_an_admin(db, viewer, None, "admin", 6)
                .await
                .expect("answers"),
            identity::Kept::Done(None)
        );
    }
);
