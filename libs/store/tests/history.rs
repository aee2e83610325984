//! The history store on both backends: idempotent, order-tolerant projection; filtered,
//! paginated reads; migrations that can run concurrently.

use std::collections::BTreeMap;

use capstan_protocol::job::Outcome;
use capstan_protocol::{
    InstanceId, JobEvent, JobEventKind, JobId, JobRecord, JobSpec, JobStatus, NodeId,
    OutputSummary, Timestamp,
};
use capstan_store::testing::TestDatabase;
use capstan_store::{History, JobQuery, Sequenced};

use capstan_store::on_both_backends;

/// The events of one job that runs to `status`: pending, running, end.
fn life(id: JobId, labels: &[(&str, &str)], status: JobStatus, first_seq: u64) -> Vec<Sequenced> {
    let mut spec = JobSpec::shell("echo hi");
    spec.name = Some("nightly".into());
    spec.stdin = Some("secret payload".into());
    spec.labels = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect::<BTreeMap<_, _>>();
    let at = Timestamp::from_millis(i64::try_from(id.timestamp_ms()).expect("fits"));
    let pending = JobRecord::new(id, spec, at).assigned(NodeId::new("n1").expect("valid"), at);
    let running = pending.started(
        InstanceId::generate(),
        at.plus(std::time::Duration::from_millis(5)),
    );
    let done = running.finished(
        &Outcome {
            status,
            exit_code: Some(if status == JobStatus::Succeeded { 0 } else { 1 }),
            signal: None,
            error: None,
            output: OutputSummary {
                stdout_bytes: 3,
                stderr_bytes: 0,
                truncated: false,
            },
        },
        at.plus(std::time::Duration::from_millis(9)),
    );
    vec![
        Sequenced {
            seq: first_seq,
            event: JobEvent::new(JobEventKind::Pending, &pending),
        },
        Sequenced {
            seq: first_seq + 1,
            event: JobEvent::new(JobEventKind::Running, &running),
        },
        Sequenced {
            seq: first_seq + 2,
            event: JobEvent::new(JobEventKind::terminal(status).expect("terminal"), &done),
        },
    ]
}

async fn dump(history: &History) -> String {
    use capstan_store::entity::{attempt, event, job, job_label};
    use sea_orm::EntityTrait;
    let db = history.connection();
    let mut jobs = job::Entity::find().all(db).await.expect("jobs");
    jobs.sort_by(|a, b| a.id.cmp(&b.id));
    let mut attempts = attempt::Entity::find().all(db).await.expect("attempts");
    attempts.sort_by(|a, b| (&a.job_id, a.attempt).cmp(&(&b.job_id, b.attempt)));
    let mut events = event::Entity::find().all(db).await.expect("events");
    events.sort_by_key(|e| e.seq);
    let mut labels = job_label::Entity::find().all(db).await.expect("labels");
    labels.sort_by(|a, b| (&a.job_id, &a.key).cmp(&(&b.job_id, &b.key)));
    format!("{jobs:?}\n{attempts:?}\n{events:?}\n{labels:?}")
}

on_both_backends!(
    a_running_event_stored_after_its_attempt_was_declared_lost_does_not_revive_it,
    |url: String| async move {
        let history = History::connect(&url).await.expect("connects");
        // A scheduler declared an attempt lost before its executor's `running` reached the
        // stream, which holds pending, lost, running. Applied in one batch, and one by one.
        for one_by_one in [false, true] {
            let events = life(JobId::generate(), &[("zone", "eu")], JobStatus::Lost, 1);
            let id = events[0].event.record.id;
            let stored = [
                events[0].clone(),
                Sequenced {
                    seq: 2,
                    event: events[2].event.clone(),
                },
                Sequenced {
                    seq: 3,
                    event: events[1].event.clone(),
                },
            ];
            if one_by_one {
                for item in &stored {
                    history
                        .apply(std::slice::from_ref(item))
                        .await
                        .expect("applied");
                }
            } else {
                history.apply(&stored).await.expect("applied");
            }
            let job = history.get(id).await.expect("read").expect("present");
            assert_eq!(
                (job.status.as_str(), job.attempt),
                ("lost", 1),
                "{one_by_one}"
            );
            let labelled = history
                .list(&JobQuery {
                    labels: vec![("zone".to_owned(), "eu".to_owned())],
                    status: Some(JobStatus::Lost),
                    limit: 10,
                    ..JobQuery::default()
                })
                .await
                .expect("listed");
            assert!(
                labelled.iter().any(|job| job.id == id.to_string()),
                "the label rows follow the job row ({one_by_one})"
            );
        }
    }
);

on_both_backends!(
    an_attempt_whose_start_had_no_event_of_its_own_is_recorded_with_the_start_its_outcome_carries,
    |url: String| async move {
        let history = History::connect(&url).await.expect("connects");
        // An attempt shorter than the executor's announce delay: pending, then its end.
        let events = life(JobId::generate(), &[], JobStatus::Succeeded, 1);
        let id = events[0].event.record.id;
        let done = &events[2].event.record;
        history
            .apply(&[
                events[0].clone(),
                Sequenced {
                    seq: 2,
                    event: events[2].event.clone(),
                },
            ])
            .await
            .expect("applied");
        let attempts = history.attempts(id).await.expect("attempts");
        assert_eq!(attempts.len(), 1);
        let attempt = &attempts[0];
        assert_eq!(
            (
                attempt.status.as_str(),
                attempt.node.as_deref(),
                attempt.started_at,
                attempt.finished_at
            ),
            (
                "succeeded",
                Some("n1"),
                done.started_at.map(Timestamp::as_millis),
                done.finished_at.map(Timestamp::as_millis)
            )
        );
        let job = history.get(id).await.expect("read").expect("present");
        assert_eq!(job.status.as_str(), "succeeded");
        let kinds: Vec<String> = history
            .events(id)
            .await
            .expect("events")
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(kinds, ["pending", "succeeded"]);
    }
);

on_both_backends!(
    replayed_and_reordered_batches_give_the_same_rows,
    |url: String| async move {
        let history = History::connect(&url).await.expect("connects");
        let mut all = Vec::new();
        for n in 0..20u64 {
            let status = if n % 3 == 0 {
                JobStatus::Failed
            } else {
                JobStatus::Succeeded
            };
            all.extend(life(
                JobId::generate(),
                &[("zone", "eu")],
                status,
                1 + n * 3,
            ));
        }
        history.apply(&all).await.expect("applied");
        let once = dump(&history).await;

        // The same events again, and in a shuffled order split over batches: nothing changes.
        history.apply(&all).await.expect("applied again");
        let mut reversed = all.clone();
        reversed.reverse();
        for chunk in reversed.chunks(7) {
            history.apply(chunk).await.expect("applied reordered");
        }
        assert_eq!(dump(&history).await, once);

        let job = history
            .get(all[0].event.record.id)
            .await
            .expect("read")
            .expect("present");
        assert_eq!((job.status.as_str(), job.exit_code), ("failed", Some(1)));
        assert!(
            !job.spec.contains("secret payload"),
            "payloads are not kept: {}",
            job.spec
        );
        let events = history
            .events(all[0].event.record.id)
            .await
            .expect("events");
        let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["pending", "running", "failed"]);
        let attempts = history
            .attempts(all[0].event.record.id)
            .await
            .expect("attempts");
        assert_eq!(attempts.len(), 1);
        assert_eq!(attempts[0].status, "failed");
    }
);

on_both_backends!(
    an_older_event_never_overwrites_a_newer_one,
    |url: String| async move {
        let history = History::connect(&url).await.expect("connects");
        let events = life(JobId::generate(), &[], JobStatus::Succeeded, 10);
        let id = events[0].event.record.id;
        history.apply(&events[2..]).await.expect("end first");
        history.apply(&events[..2]).await.expect("then the start");
        let job = history.get(id).await.expect("read").expect("present");
        assert_eq!(job.status, "succeeded");
        assert_eq!(job.last_seq, 12);
        assert_eq!(history.events(id).await.expect("events").len(), 3);
    }
);

on_both_backends!(
    lists_are_newest_first_filtered_and_paged_stably,
    |url: String| async move {
        let history = History::connect(&url).await.expect("connects");
        let mut ids = Vec::new();
        let mut seq = 1;
        for n in 0..30u64 {
            // Distinct, increasing submission times.
            let id = JobId::from(ulid::Ulid::from_parts(
                1_700_000_000_000 + n * 1000,
                u128::from(n),
            ));
            let labels: &[(&str, &str)] = if n % 2 == 0 {
                &[("zone", "eu")]
            } else {
                &[("zone", "us")]
            };
            let status = if n % 5 == 0 {
                JobStatus::Failed
            } else {
                JobStatus::Succeeded
            };
            history
                .apply(&life(id, labels, status, seq))
                .await
                .expect("applied");
            seq += 3;
            ids.push(id);
        }
        let newest_first: Vec<String> = ids.iter().rev().map(ToString::to_string).collect();

        // Pages of 8, following the cursor, while newer jobs keep arriving between pages.
        let mut seen = Vec::new();
        let mut before = None;
        loop {
            let page = history
                .list(&JobQuery {
                    before,
                    limit: 8,
                    ..Default::default()
                })
                .await
                .expect("page");
            if page.is_empty() {
                break;
            }
            seen.extend(page.iter().map(|j| j.id.clone()));
            before = Some(
                page.last()
                    .expect("non-empty")
                    .id
                    .parse()
                    .expect("a job id"),
            );
            let newer = JobId::from(ulid::Ulid::from_parts(1_800_000_000_000 + seq, 0));
            history
                .apply(&life(newer, &[], JobStatus::Succeeded, seq + 1000))
                .await
                .expect("applied");
            seq += 3;
        }
        assert_eq!(
            seen, newest_first,
            "every job once, newest first, whatever arrived meanwhile"
        );

        let failed = history
            .list(&JobQuery {
                status: Some(JobStatus::Failed),
                limit: 100,
                ..Default::default()
            })
            .await
            .expect("failed");
        assert_eq!(failed.len(), 6);
        let eu = history
            .list(&JobQuery {
                labels: vec![("zone".into(), "eu".into())],
                limit: 100,
                ..Default::default()
            })
            .await
            .expect("eu");
        assert_eq!(eu.len(), 15);
        let window = history
            .list(&JobQuery {
                since: Some(Timestamp::from_millis(1_700_000_010_000)),
                until: Some(Timestamp::from_millis(1_700_000_020_000)),
                limit: 100,
                ..Default::default()
            })
            .await
            .expect("window");
        assert_eq!(window.len(), 10);
        let named = history
            .list(&JobQuery {
                name: Some("nightly".into()),
                limit: 5,
                ..Default::default()
            })
            .await
            .expect("named");
        assert_eq!(named.len(), 5);

        let counts = history.status_counts().await.expect("counts");
        assert_eq!(counts.known.len(), JobStatus::ALL.len());
        assert_eq!(
            (
                counts.of(JobStatus::Failed),
                counts.of(JobStatus::Running),
                counts.unknown
            ),
            (6, 0, 0)
        );
    }
);

on_both_backends!(
    migrations_run_concurrently_and_again_without_error,
    |url: String| async move {
        let (a, b) = tokio::join!(History::connect(&url), History::connect(&url));
        a.expect("first");
        b.expect("second");
        History::connect(&url).await.expect("third");
    }
);

#[tokio::test]
async fn an_unsupported_database_url_is_refused() {
    let error = History::connect("mysql://root@localhost/x")
        .await
        .expect_err("refused");
    assert!(
        error.to_string().contains("sqlite:// or postgres://"),
        "{error}"
    );
}

#[tokio::test]
async fn a_replica_connects_to_sqlite_while_another_is_writing() {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let db = TestDatabase::sqlite();
    let first = History::connect(db.url()).await.expect("first replica");
    // The first replica holds a write transaction open while the second one starts.
    let txn = first.connection().begin().await.expect("begin");
    txn.execute_unprepared("DELETE FROM events")
        .await
        .expect("write");
    let second = tokio::spawn({
        let url = db.url().to_owned();
        async move { History::connect(&url).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    txn.commit().await.expect("commit");
    second
        .await
        .expect("joins")
        .expect("the second replica connects once the write ends");
}

on_both_backends!(
    status_and_label_filters_follow_each_job_as_its_status_changes,
    |url: String| async move {
        let history = History::connect(&url).await.expect("connects");
        let ids: Vec<JobId> = (0..12u64)
            .map(|n| {
                JobId::from(ulid::Ulid::from_parts(
                    1_700_000_000_000 + n * 1000,
                    u128::from(n),
                ))
            })
            .collect();
        let labels_of = |n: usize| -> &'static [(&'static str, &'static str)] {
            match n % 3 {
                0 => &[("zone", "eu"), ("tier", "gold")],
                1 => &[("zone", "eu")],
                _ => &[("zone", "us")],
            }
        };
        let final_status = |n: usize| {
            if n.is_multiple_of(4) {
                JobStatus::Failed
            } else {
                JobStatus::Succeeded
            }
        };
        // Each job's pending event first: every labelled job is pending.
        let lives: Vec<Vec<Sequenced>> = ids
            .iter()
            .enumerate()
            .map(|(n, id)| life(*id, labels_of(n), final_status(n), 1 + 3 * n as u64))
            .collect();
        let firsts: Vec<Sequenced> = lives.iter().map(|l| l[0].clone()).collect();
        history.apply(&firsts).await.expect("applied");
        let page = |status: Option<JobStatus>, labels: &[(&str, &str)], before: Option<JobId>| {
            let history = history.clone();
            let query = JobQuery {
                status,
                labels: labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
                before,
                limit: 3,
                ..Default::default()
            };
            async move {
                history
                    .list(&query)
                    .await
                    .expect("listed")
                    .into_iter()
                    .map(|row| row.id)
                    .collect::<Vec<String>>()
            }
        };
        let expected = |status: JobStatus, label: (&str, &str)| -> Vec<String> {
            ids.iter()
                .enumerate()
                .rev()
                .filter(|(n, _)| final_status(*n) == status && labels_of(*n).contains(&label))
                .map(|(_, id)| id.to_string())
                .collect()
        };
        let eu = [("zone", "eu")];
        assert_eq!(page(Some(JobStatus::Pending), &eu, None).await.len(), 3);
        assert!(page(Some(JobStatus::Failed), &eu, None).await.is_empty());

        // The rest of every life, the newest events first: an older event arriving after a
        // newer one must not move a job (or its labels) back.
        let mut rest: Vec<Sequenced> = lives.iter().flat_map(|l| l[1..].to_vec()).collect();
        rest.reverse();
        for item in rest {
            history.apply(&[item]).await.expect("applied");
        }
        assert!(page(Some(JobStatus::Pending), &eu, None).await.is_empty());
        assert!(page(Some(JobStatus::Running), &eu, None).await.is_empty());

        // Every page of `succeeded` in `zone=eu`, following the cursor.
        let mut seen = Vec::new();
        let mut before = None;
        loop {
            let ids = page(Some(JobStatus::Succeeded), &eu, before).await;
            if ids.is_empty() {
                break;
            }
            before = Some(ids.last().expect("a row").parse().expect("an id"));
            seen.extend(ids);
        }
        assert_eq!(seen, expected(JobStatus::Succeeded, ("zone", "eu")));
        assert_eq!(
            page(Some(JobStatus::Failed), &eu, None).await,
            expected(JobStatus::Failed, ("zone", "eu"))
                .into_iter()
                .take(3)
                .collect::<Vec<_>>()
        );
        // A second label narrows further; a label alone ignores status.
        let gold: Vec<String> = page(
            Some(JobStatus::Succeeded),
            &[("zone", "eu"), ("tier", "gold")],
            None,
        )
        .await;
        assert!(!gold.is_empty());
        for id in &gold {
            let n = ids
                .iter()
                .position(|i| i.to_string() == *id)
                .expect("known");
            assert_eq!(n % 3, 0, "{id} has no tier=gold");
        }
        assert_eq!(page(None, &[("zone", "us")], None).await.len(), 3);
        assert!(
            page(Some(JobStatus::Succeeded), &[("zone", "mars")], None)
                .await
                .is_empty()
        );
    }
);

on_both_backends!(
    a_schedules_runs_are_listed_by_its_name_and_a_value_naming_no_schedule_is_not_kept,
    |url: String| async move {
        let history = History::connect(&url).await.expect("connects");
        let with_metadata = |n: u64, value: Option<&str>| {
            let id = JobId::from(ulid::Ulid::from_parts(1_700_000_000_000 + n * 1000, 0));
            let mut events = life(id, &[], JobStatus::Succeeded, n * 10 + 1);
            for item in &mut events {
                if let Some(value) = value {
                    item.event
                        .record
                        .spec
                        .metadata
                        .insert("capstan.io/schedule".into(), value.to_owned());
                }
            }
            (id, events)
        };
        let long = "x".repeat(300);
        let mut runs = Vec::new();
        for (n, value) in [
            (1, Some("nightly")),
            (2, Some("hourly")),
            (3, Some("nightly")),
            (4, None),
            (5, Some("not a name")),
            (6, Some(long.as_str())),
        ] {
            let (id, events) = with_metadata(n, value);
            history.apply(&events).await.expect("applied");
            if value == Some("nightly") {
                runs.push(id.to_string());
            }
        }
        runs.reverse();
        let listed: Vec<String> = history
            .list(&JobQuery {
                schedule: Some("nightly".into()),
                limit: 10,
                ..Default::default()
            })
            .await
            .expect("listed")
            .into_iter()
            .map(|row| {
                assert_eq!(row.schedule.as_deref(), Some("nightly"));
                row.id
            })
            .collect();
        assert_eq!(listed, runs, "the schedule's runs, newest first");
        let all = history
            .list(&JobQuery {
                limit: 10,
                ..Default::default()
            })
            .await
            .expect("all");
        let kept: Vec<Option<String>> = all.into_iter().map(|row| row.schedule).collect();
        assert_eq!(
            kept,
            [
                None,
                None,
                None,
                Some("nightly".to_owned()),
                Some("hourly".to_owned()),
                Some("nightly".to_owned())
            ]
        );
    }
);
