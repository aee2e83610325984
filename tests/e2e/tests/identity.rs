//! Identity and access, end to end: the API as a separate process, on SQLite and on PostgreSQL
//! (each scenario runs on both), with a real nats-server and, where jobs run, the whole mesh.
//! Credentials are attacked the way a client would: missing, forged, expired, replayed,
//! revoked, brute-forced; each refusal is checked for its status, its problem document and its
//! audit record.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use capstan_e2e::Cluster;
use capstan_store::testing::TestDatabase;
use capstan_testkit::http::{HttpClient, Reply};
use capstan_testkit::{OidcIssuer, wait_until};
use futures::StreamExt;
use http::{Method, StatusCode};
use serde_json::{Value, json};

#[derive(Clone, Copy, Debug)]
enum Backend {
    Sqlite,
    Postgres,
}

/// One scenario per test module, run once per backend.
macro_rules! on_both_backends {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[tokio::test]
            async fn on_sqlite() {
                super::$scenario(super::Backend::Sqlite).await;
            }
            #[tokio::test]
            async fn on_postgresql() {
                super::$scenario(super::Backend::Postgres).await;
            }
        }
    )*};
}

on_both_backends!(
    every_route_but_health_docs_and_login_needs_a_valid_credential,
    refresh_tokens_rotate_and_a_replayed_one_ends_its_whole_session,
    roles_decide_who_submits_cancels_manages_and_reads_secrets,
    disabled_users_and_revoked_tokens_are_refused_at_once_on_every_replica,
    api_tokens_act_for_their_creator_within_its_role_and_show_their_secret_once,
    every_change_and_refusal_is_audited_with_who_what_where_and_never_a_secret,
    brute_force_and_hostile_input_get_precise_refusals_and_the_api_keeps_serving,
    tokens_of_the_oidc_provider_are_verified_against_its_published_keys,
    rate_limits_answer_429_with_retry_after_per_principal,
    the_admin_purge_removes_finished_jobs_from_history_bucket_and_streams,
    hosts_and_origins_outside_the_allow_list_are_refused,
    the_first_start_creates_one_admin_and_never_a_fixed_password,
    users_are_managed_by_admins_with_a_password_policy_and_a_last_admin_kept,
    metrics_need_a_credential_unless_the_open_listener_is_configured,
);

const PASSWORD: &str = "a-long-enough-password";

/// A mesh (if asked) and one API on a fresh database of `backend`.
struct Site {
    cluster: Cluster,
    api: String,
    db: TestDatabase,
}

async fn database(backend: Backend) -> TestDatabase {
    match backend {
        Backend::Sqlite => TestDatabase::sqlite(),
        Backend::Postgres => TestDatabase::postgres().await,
    }
}

async fn site(backend: Backend, mesh: bool, extra: &[(&str, String)]) -> Site {
    let mut cluster = Cluster::start().await;
    if mesh {
        cluster.registry("registry-1");
        cluster.scheduler("scheduler-1");
        cluster.executor("exec-1", 4, &[]);
    }
    let db = database(backend).await;
    let mut vars = vec![("CAPSTAN_DATABASE_URL", db.url().to_owned())];
    vars.extend(extra.iter().cloned());
    let api = cluster.api_with("api-1", &vars).await;
    if mesh {
        cluster.wait_nodes_up(&["exec-1"]).await;
    }
    Site { cluster, api, db }
}

impl Site {
    fn admin(&self) -> HttpClient {
        self.cluster.http(&self.api)
    }

    fn anonymous(&self) -> HttpClient {
        HttpClient::new(self.api.clone())
    }

    /// Creates `name` with `role` and returns a client logged in as them.
    async fn user(&self, name: &str, role: &str) -> HttpClient {
        let reply = self
            .admin()
            .post_json(
                "/api/v1/users",
                &json!({"name": name, "password": PASSWORD, "role": role}).to_string(),
            )
            .await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
        self.anonymous().login(name, PASSWORD).await
    }
}

fn assert_problem(reply: &Reply, status: StatusCode) -> Value {
    assert_eq!(reply.status, status, "{}", reply.text());
    assert!(
        reply.content_type().starts_with("application/problem+json"),
        "{}: {}",
        reply.content_type(),
        reply.text()
    );
    let body = reply.json();
    assert_eq!(body["status"], status.as_u16(), "{body}");
    assert!(!body["detail"].as_str().unwrap_or("").is_empty(), "{body}");
    body
}

fn assert_unauthorized(reply: &Reply) -> String {
    let body = assert_problem(reply, StatusCode::UNAUTHORIZED);
    let challenge = reply
        .headers
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    assert!(challenge.starts_with("Bearer"), "challenge: {challenge:?}");
    body["detail"].as_str().unwrap_or("").to_owned()
}

async fn send_json(http: &HttpClient, method: Method, path: &str, body: Value) -> Reply {
    http.send(
        method,
        path,
        &[("content-type", "application/json")],
        body.to_string(),
    )
    .await
}

async fn delete(http: &HttpClient, path: &str) -> Reply {
    http.send(Method::DELETE, path, &[], Vec::new()).await
}

/// Every audit record matching `query` (`action=…&principal=…`), newest first, read page by
/// page.
async fn audit(admin: &HttpClient, query: &str) -> Vec<Value> {
    let mut records = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/api/v1/audit?limit=500&{query}");
        if let Some(cursor) = &cursor {
            path.push_str(&format!("&cursor={cursor}"));
        }
        let reply = admin.get(&path).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let page = reply.json();
        records.extend(page["records"].as_array().cloned().unwrap_or_default());
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return records,
        }
    }
}

/// Waits until at least `count` audit records match `query`, and returns them.
async fn audited(admin: &HttpClient, query: &str, count: usize) -> Vec<Value> {
    wait_until(
        &format!("{count} audit records of {query}"),
        Duration::from_secs(30),
        || async {
            let records = audit(admin, query).await;
            (records.len() >= count).then_some(records)
        },
    )
    .await
}

/// Waits until `client` is refused (`401`) on `GET /api/v1/users/me`; how long that took.
async fn until_refused(client: &HttpClient, what: &str, deadline: Duration) -> Duration {
    let since = Instant::now();
    wait_until(what, deadline, || async {
        (client.get("/api/v1/users/me").await.status == StatusCode::UNAUTHORIZED).then_some(())
    })
    .await;
    since.elapsed()
}

fn access_token(http: &HttpClient) -> String {
    http.bearer().expect("logged in").to_owned()
}

/// A JWT with `header` and `claims`, signed with HMAC-SHA256 under `key`.
fn hs256(header: Value, claims: &Value, key: &[u8]) -> String {
    let header: jsonwebtoken::Header = serde_json::from_value(header).expect("a header");
    jsonwebtoken::encode(
        &header,
        claims,
        &jsonwebtoken::EncodingKey::from_secret(key),
    )
    .expect("signs")
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after the epoch")
        .as_secs()
}

async fn every_route_but_health_docs_and_login_needs_a_valid_credential(backend: Backend) {
    let site = site(backend, false, &[]).await;
    let anonymous = site.anonymous();
    for path in [
        "/api/v1/jobs",
        "/api/v1/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV",
        "/api/v1/nodes",
        "/api/v1/users",
        "/api/v1/users/me",
        "/api/v1/tokens",
        "/api/v1/audit",
        "/metrics",
    ] {
        assert_unauthorized(&anonymous.get(path).await);
    }
    assert_unauthorized(
        &anonymous
            .post_json("/api/v1/jobs", r#"{"command": "true"}"#)
            .await,
    );
    assert_unauthorized(
        &delete(
            &anonymous,
            "/api/v1/jobs?finished_before=2030-01-01T00:00:00Z",
        )
        .await,
    );
    for path in ["/healthz", "/readyz", "/openapi.json", "/docs/"] {
        let reply = anonymous.get(path).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text());
    }

    // Forged, foreign, expired and malformed tokens.
    let admin = site.admin();
    let genuine = access_token(&admin);
    let header = jsonwebtoken::decode_header(&genuine).expect("a JWT");
    let kid = header.kid.expect("a key id");
    let key = capstan_api::TEST_JWT_KEY.as_bytes();
    let claims = |changes: Value| {
        let t = now();
        let mut claims = json!({
            "iss": "capstan", "aud": "capstan-api", "sub": "admin", "exp": t + 600, "iat": t,
            "nbf": t, "jti": "forged", "role": "admin", "sid": "none",
            "iat_ms": t * 1000,
        });
        for (name, value) in changes.as_object().expect("an object") {
            claims[name] = value.clone();
        }
        claims
    };
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims(json!({})).to_string())
    );
    let cases = [
        ("garbage", "not-a-jwt".to_owned(), "well-formed"),
        ("alg none", none, "algorithm"),
        (
            "another key",
            hs256(
                json!({"alg": "HS256", "kid": kid}),
                &claims(json!({})),
                b"some-other-key-that-is-long-enough!!",
            ),
            "invalid",
        ),
        (
            "expired",
            hs256(
                json!({"alg": "HS256", "kid": kid}),
                &claims(json!({"exp": now() - 120})),
                key,
            ),
            "expired",
        ),
        (
            "wrong audience",
            hs256(
                json!({"alg": "HS256", "kid": kid}),
                &claims(json!({"aud": "another-api"})),
                key,
            ),
            "audience",
        ),
        (
            "unknown key id",
            hs256(
                json!({"alg": "HS256", "kid": "elsewhere"}),
                &claims(json!({})),
                key,
            ),
            "unknown key",
        ),
        (
            "RS256 under our key id",
            format!(
                "{}.{}.c2ln",
                URL_SAFE_NO_PAD.encode(json!({"alg": "RS256", "kid": kid}).to_string()),
                URL_SAFE_NO_PAD.encode(claims(json!({})).to_string())
            ),
            "algorithm",
        ),
        (
            "a role that does not exist",
            hs256(
                json!({"alg": "HS256", "kid": kid}),
                &claims(json!({"role": "root"})),
                key,
            ),
            "role",
        ),
    ];
    let mut request_ids = HashSet::new();
    for (case, token, expected) in &cases {
        let reply = anonymous
            .with_bearer(token.clone())
            .get("/api/v1/jobs")
            .await;
        let detail = assert_unauthorized(&reply);
        assert!(detail.contains(expected), "{case}: {detail}");
        request_ids.insert(
            reply.headers["x-request-id"]
                .to_str()
                .expect("text")
                .to_owned(),
        );
    }
    // A valid token still works, and each refusal is in the audit trail with its request id.
    assert_eq!(admin.get("/api/v1/jobs").await.status, StatusCode::OK);
    let records = audited(&admin, "action=auth.unauthenticated", 9 + cases.len() + 1).await;
    for id in &request_ids {
        let record = records
            .iter()
            .find(|r| r["request_id"] == id.as_str())
            .unwrap_or_else(|| panic!("no audit record of request {id}"));
        assert_eq!(record["outcome"], "failure");
        assert_eq!(record["status"], 401);
        assert_eq!(record["client"], "127.0.0.1");
        assert!(record["principal"].is_null(), "{record}");
    }

    // The OpenAPI document declares the bearer scheme on every protected operation.
    let spec = anonymous.get("/openapi.json").await.json();
    let public = [
        "/api/v1/auth/login",
        "/api/v1/auth/refresh",
        "/api/v1/auth/logout",
        "/healthz",
        "/readyz",
    ];
    for (path, operations) in spec["paths"].as_object().expect("paths") {
        for (method, operation) in operations.as_object().expect("operations") {
            let secured = operation["security"]
                .as_array()
                .is_some_and(|s| !s.is_empty());
            assert_eq!(
                secured,
                !public.contains(&path.as_str()),
                "{method} {path}: security {}",
                operation["security"]
            );
        }
    }
    assert_eq!(
        spec["components"]["securitySchemes"]["BearerAuth"]["scheme"],
        "bearer"
    );
    drop(site.db);
}

async fn refresh_tokens_rotate_and_a_replayed_one_ends_its_whole_session(backend: Backend) {
    let site = site(
        backend,
        false,
        &[("CAPSTAN_ACCESS_TOKEN_TTL", "15m".to_owned())],
    )
    .await;
    let anonymous = site.anonymous();
    let login = |password: &'static str| {
        let anonymous = anonymous.clone();
        async move {
            anonymous
                .post_json(
                    "/api/v1/auth/login",
                    &json!({"username": "admin", "password": password}).to_string(),
                )
                .await
        }
    };
    let first = login(capstan_api::TEST_ADMIN_PASSWORD).await;
    assert_eq!(first.status, StatusCode::OK, "{}", first.text());
    let first = first.json();
    assert_eq!(first["token_type"], "Bearer");
    assert_eq!(first["expires_in"], 900);
    let refresh = |token: &Value| {
        let anonymous = anonymous.clone();
        let body = json!({"refresh_token": token}).to_string();
        async move { anonymous.post_json("/api/v1/auth/refresh", &body).await }
    };

    let second = refresh(&first["refresh_token"]).await;
    assert_eq!(second.status, StatusCode::OK, "{}", second.text());
    let second = second.json();
    assert_ne!(second["refresh_token"], first["refresh_token"]);
    let access = anonymous.with_bearer(second["access_token"].as_str().expect("a token"));
    assert_eq!(access.get("/api/v1/users/me").await.json()["name"], "admin");

    // The first refresh token again: refused, and its whole session ends with it.
    let replay = refresh(&first["refresh_token"]).await;
    assert!(assert_unauthorized(&replay).contains("used before"));
    assert!(assert_unauthorized(&refresh(&second["refresh_token"]).await).contains("ended"));
    until_refused(
        &access,
        "the session's access token to be refused",
        Duration::from_secs(5),
    )
    .await;
    let reuse = audited(&site.admin(), "action=auth.refresh_reuse", 1).await;
    assert_eq!(reuse[0]["resource"], "user/admin");
    assert_eq!(reuse[0]["outcome"], "failure");

    // Logout ends a session: its refresh token and its access token stop working.
    let third = login(capstan_api::TEST_ADMIN_PASSWORD).await.json();
    let logout = anonymous
        .post_json(
            "/api/v1/auth/logout",
            &json!({"refresh_token": third["refresh_token"]}).to_string(),
        )
        .await;
    assert_eq!(logout.status, StatusCode::NO_CONTENT, "{}", logout.text());
    assert_unauthorized(&refresh(&third["refresh_token"]).await);
    let detail = assert_unauthorized(
        &anonymous
            .with_bearer(third["access_token"].as_str().expect("a token"))
            .get("/api/v1/users/me")
            .await,
    );
    assert!(detail.contains("ended"), "{detail}");
    assert_unauthorized(&refresh(&json!("csr_made-up")).await);
    drop(site.db);
}

async fn roles_decide_who_submits_cancels_manages_and_reads_secrets(backend: Backend) {
    let mut site = site(backend, true, &[]).await;
    let admin = site.admin();
    let vera = site.user("vera", "viewer").await;
    let olga = site.user("olga", "operator").await;
    let oscar = site.user("oscar", "operator").await;

    let refused = assert_problem(
        &vera
            .post_json("/api/v1/jobs", r#"{"command": "true"}"#)
            .await,
        StatusCode::FORBIDDEN,
    );
    assert_eq!(refused["permission"], "jobs:submit");

    let submitted = olga
        .post_json(
            "/api/v1/jobs",
            &json!({"command": "sleep 60", "env": {"API_KEY": "s3cret-value"}}).to_string(),
        )
        .await;
    assert_eq!(
        submitted.status,
        StatusCode::ACCEPTED,
        "{}",
        submitted.text()
    );
    let id = submitted.json()["id"].as_str().expect("an id").to_owned();
    let job = wait_until(
        "the job to be accepted",
        Duration::from_secs(30),
        || async {
            let reply = vera.get(&format!("/api/v1/jobs/{id}")).await;
            (reply.status == StatusCode::OK).then(|| reply.json())
        },
    )
    .await;
    assert_eq!(
        job["spec"]["env"]["API_KEY"], "***",
        "a viewer sees env masked"
    );
    assert_eq!(
        job["submitted_by"],
        json!({"principal": "olga", "via": "password"}),
        "a value that is absent is left out, not sent as null"
    );
    let own = olga.get(&format!("/api/v1/jobs/{id}")).await.json();
    assert_eq!(own["spec"]["env"]["API_KEY"], "s3cret-value");
    let theirs = oscar.get(&format!("/api/v1/jobs/{id}")).await.json();
    assert_eq!(theirs["spec"]["env"]["API_KEY"], "***");
    assert_eq!(
        admin.get(&format!("/api/v1/jobs/{id}")).await.json()["spec"]["env"]["API_KEY"],
        "s3cret-value"
    );
    // The API shows an accepted job from its submission until a scheduler or executor has
    // created its record: wait for the record.
    let mesh = site.cluster.mesh().await;
    let record = wait_until("the job's record", Duration::from_secs(30), || async {
        mesh.jobs.get(&id).await.expect("read")
    })
    .await;
    assert_eq!(
        record.value.submitted_by.expect("attributed").principal,
        "olga"
    );
    wait_until(
        "the list to filter by submitter",
        Duration::from_secs(30),
        || async {
            let page = vera.get("/api/v1/jobs?submitted_by=olga").await.json();
            let ids: Vec<&str> = page["jobs"]
                .as_array()?
                .iter()
                .filter_map(|j| j["id"].as_str())
                .collect();
            ids.contains(&id.as_str()).then_some(())
        },
    )
    .await;
    let by_oscar = vera.get("/api/v1/jobs?submitted_by=oscar").await.json();
    assert_eq!(by_oscar["jobs"], json!([]));

    // Operators cancel their own jobs only; administrators any.
    let cancel = format!("/api/v1/jobs/{id}/cancel");
    let refused = assert_problem(&oscar.post_json(&cancel, "").await, StatusCode::FORBIDDEN);
    assert_eq!(refused["permission"], "jobs:cancel:any");
    assert!(refused["detail"].as_str().unwrap_or("").contains("olga"));
    assert_eq!(
        olga.post_json(&cancel, "").await.status,
        StatusCode::ACCEPTED
    );
    let second = oscar
        .post_json("/api/v1/jobs", r#"{"command": "sleep 60"}"#)
        .await
        .json();
    let second = second["id"].as_str().expect("an id");
    wait_until("oscar's job to exist", Duration::from_secs(30), || async {
        (admin.get(&format!("/api/v1/jobs/{second}")).await.status == StatusCode::OK).then_some(())
    })
    .await;
    let cancelled = admin
        .post_json(&format!("/api/v1/jobs/{second}/cancel"), "")
        .await;
    assert_eq!(
        cancelled.status,
        StatusCode::ACCEPTED,
        "{}",
        cancelled.text()
    );

    // Nodes, users and the audit trail are the administrators'.
    let drain = assert_problem(
        &olga.post_json("/api/v1/nodes/exec-1/drain", "").await,
        StatusCode::FORBIDDEN,
    );
    assert_eq!(drain["permission"], "nodes:manage");
    assert_eq!(vera.get("/api/v1/nodes").await.status, StatusCode::OK);
    assert_eq!(
        admin
            .post_json("/api/v1/nodes/exec-1/cordon", "")
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        admin
            .post_json("/api/v1/nodes/exec-1/uncordon", "")
            .await
            .status,
        StatusCode::OK
    );
    for (client, path) in [(&olga, "/api/v1/users"), (&olga, "/api/v1/audit")] {
        assert_problem(&client.get(path).await, StatusCode::FORBIDDEN);
    }
    let denied = audited(&admin, "action=auth.denied&principal=oscar", 1).await;
    assert!(
        denied[0]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("job.cancel")
    );

    // The attribution stays once the job has ended and is read from the history.
    wait_until(
        "olga's job to be recorded cancelled",
        Duration::from_secs(30),
        || async {
            let job = admin.get(&format!("/api/v1/jobs/{id}")).await.json();
            (job["status"] == "cancelled").then_some(())
        },
    )
    .await;
    drop(site.db);
}

async fn disabled_users_and_revoked_tokens_are_refused_at_once_on_every_replica(backend: Backend) {
    let site = site(backend, false, &[]).await;
    let mut cluster = site.cluster;
    let second = cluster
        .api_with(
            "api-2",
            &[("CAPSTAN_DATABASE_URL", site.db.url().to_owned())],
        )
        .await;
    let one = cluster.http(&site.api);
    let two = cluster.http(&second);
    let created = one
        .post_json(
            "/api/v1/users",
            &json!({"name": "olga", "password": PASSWORD, "role": "operator"}).to_string(),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let tokens = one
        .anonymous()
        .post_json(
            "/api/v1/auth/login",
            &json!({"username": "olga", "password": PASSWORD}).to_string(),
        )
        .await
        .json();
    let olga_one = one
        .anonymous()
        .with_bearer(tokens["access_token"].as_str().expect("a token"));
    let olga_on_two = two.anonymous().with_bearer(access_token(&olga_one));
    assert_eq!(
        olga_on_two.get("/api/v1/users/me").await.status,
        StatusCode::OK
    );

    let token = olga_one
        .post_json("/api/v1/tokens", r#"{"name": "ci"}"#)
        .await;
    assert_eq!(token.status, StatusCode::CREATED, "{}", token.text());
    let token = token.json();
    let machine_on_two = two
        .anonymous()
        .with_bearer(token["token"].as_str().expect("a secret"));
    assert_eq!(
        machine_on_two.get("/api/v1/users/me").await.json()["via"],
        "token"
    );

    // Revoked on one replica, refused by the other within a second.
    let revoked = delete(
        &one,
        &format!("/api/v1/tokens/{}", token["id"].as_str().expect("an id")),
    )
    .await;
    assert_eq!(revoked.status, StatusCode::NO_CONTENT);
    let took = until_refused(
        &machine_on_two,
        "the other replica to refuse the token",
        Duration::from_secs(5),
    )
    .await;
    assert!(took < Duration::from_secs(1), "took {took:?}");

    // Disabled on one replica: the other refuses the still-valid access token, a login and a
    // refresh.
    let disabled = send_json(
        &one,
        Method::PATCH,
        "/api/v1/users/olga",
        json!({"disabled": true}),
    )
    .await;
    assert_eq!(disabled.status, StatusCode::OK, "{}", disabled.text());
    let took = until_refused(
        &olga_on_two,
        "the other replica to refuse the disabled user",
        Duration::from_secs(5),
    )
    .await;
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let login = two
        .anonymous()
        .post_json(
            "/api/v1/auth/login",
            &json!({"username": "olga", "password": PASSWORD}).to_string(),
        )
        .await;
    assert!(assert_unauthorized(&login).contains("disabled"));
    let refresh = two
        .anonymous()
        .post_json(
            "/api/v1/auth/refresh",
            &json!({"refresh_token": tokens["refresh_token"]}).to_string(),
        )
        .await;
    assert_unauthorized(&refresh);

    // Enabled again: a new login works everywhere; a demotion refuses the older token.
    send_json(
        &one,
        Method::PATCH,
        "/api/v1/users/olga",
        json!({"disabled": false}),
    )
    .await;
    let again = two.anonymous().login("olga", PASSWORD).await;
    let again_on_one = one.anonymous().with_bearer(access_token(&again));
    assert_eq!(
        again_on_one.get("/api/v1/users/me").await.json()["role"],
        "operator"
    );
    send_json(
        &two,
        Method::PATCH,
        "/api/v1/users/olga",
        json!({"role": "viewer"}),
    )
    .await;
    until_refused(
        &again_on_one,
        "the demoted user's older token to be refused",
        Duration::from_secs(5),
    )
    .await;
    let demoted = one.anonymous().login("olga", PASSWORD).await;
    assert_eq!(
        demoted.get("/api/v1/users/me").await.json()["role"],
        "viewer"
    );
    drop(site.db);
}

async fn api_tokens_act_for_their_creator_within_its_role_and_show_their_secret_once(
    backend: Backend,
) {
    let site = site(backend, false, &[]).await;
    let admin = site.admin();
    let olga = site.user("olga", "operator").await;
    let created = olga
        .post_json(
            "/api/v1/tokens",
            r#"{"name": "deploy bot", "expires_in": 3600}"#,
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let created = created.json();
    let secret = created["token"].as_str().expect("the secret").to_owned();
    assert!(secret.starts_with("cst_"));
    assert_eq!(created["role"], "operator");
    assert_eq!(created["owner"], "olga");
    let bot = site.anonymous().with_bearer(secret.clone());
    let me = bot.get("/api/v1/users/me").await.json();
    assert_eq!(
        (me["name"].clone(), me["via"].clone(), me["token"].clone()),
        (json!("olga"), json!("token"), json!("deploy bot"))
    );
    // Lists never show a secret; only token managers see others' tokens.
    let listed = olga.get("/api/v1/tokens").await;
    assert!(!listed.text().contains(&secret));
    assert_eq!(listed.json()["tokens"][0]["name"], "deploy bot");
    assert!(
        admin
            .get("/api/v1/tokens")
            .await
            .text()
            .contains("deploy bot")
    );
    assert_problem(
        &olga.get("/api/v1/tokens?owner=admin").await,
        StatusCode::FORBIDDEN,
    );
    // Never more than the creator.
    assert_problem(
        &olga
            .post_json("/api/v1/tokens", r#"{"name": "x", "role": "admin"}"#)
            .await,
        StatusCode::FORBIDDEN,
    );
    let bad = assert_problem(
        &olga
            .post_json("/api/v1/tokens", r#"{"name": "x", "expires_in": 5}"#)
            .await,
        StatusCode::BAD_REQUEST,
    );
    assert_eq!(bad["field"], "expires_in");
    let bad = assert_problem(
        &olga
            .post_json("/api/v1/tokens", r#"{"name": "x", "role": "root"}"#)
            .await,
        StatusCode::BAD_REQUEST,
    );
    assert_eq!(bad["field"], "role");
    // A token makes no tokens: a leaked one cannot outlive its revocation through children.
    assert_problem(
        &bot.post_json(
            "/api/v1/tokens",
            r#"{"name": "child", "expires_in": 31536000}"#,
        )
        .await,
        StatusCode::FORBIDDEN,
    );
    // A weaker token of a user cannot revoke a stronger one of the same user.
    let viewer_token = olga
        .post_json("/api/v1/tokens", r#"{"name": "metrics", "role": "viewer"}"#)
        .await
        .json();
    let scraper = site
        .anonymous()
        .with_bearer(viewer_token["token"].as_str().expect("a secret"));
    let refused = assert_problem(
        &delete(
            &scraper,
            &format!("/api/v1/tokens/{}", created["id"].as_str().expect("an id")),
        )
        .await,
        StatusCode::FORBIDDEN,
    );
    assert_eq!(refused["permission"], "tokens:manage");
    assert_eq!(bot.get("/api/v1/users/me").await.status, StatusCode::OK);
    // The token can submit as its creator can; demote the creator and it cannot.
    assert_eq!(
        bot.post_json("/api/v1/jobs", r#"{"command": "true"}"#)
            .await
            .status,
        StatusCode::ACCEPTED
    );
    send_json(
        &admin,
        Method::PATCH,
        "/api/v1/users/olga",
        json!({"role": "viewer"}),
    )
    .await;
    wait_until(
        "the token to lose its creator's lost permission",
        Duration::from_secs(15),
        || async {
            (bot.post_json("/api/v1/jobs", r#"{"command": "true"}"#)
                .await
                .status
                == StatusCode::FORBIDDEN)
                .then_some(())
        },
    )
    .await;
    // Another's token cannot be revoked by an operator; the owner's deletion revokes it.
    let admin_token = admin
        .post_json("/api/v1/tokens", r#"{"name": "admin's"}"#)
        .await
        .json();
    let olga = site.anonymous().login("olga", PASSWORD).await;
    assert_problem(
        &delete(
            &olga,
            &format!("/api/v1/tokens/{}", admin_token["id"].as_str().expect("id")),
        )
        .await,
        StatusCode::FORBIDDEN,
    );
    assert_eq!(
        delete(&admin, "/api/v1/users/olga").await.status,
        StatusCode::NO_CONTENT
    );
    until_refused(
        &bot,
        "a deleted user's token to be refused",
        Duration::from_secs(15),
    )
    .await;
    assert_problem(
        &delete(&admin, "/api/v1/tokens/01ARZ3NDEKTSV4RRFFQ69G5FAV").await,
        StatusCode::NOT_FOUND,
    );
    drop(site.db);
}

/// Every file of `dir` whose name starts with `stem`, read whole (a SQLite database and its
/// write-ahead log).
fn files_starting_with(dir: &std::path::Path, stem: &str) -> Vec<u8> {
    let mut bytes = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(stem) {
            bytes.extend(std::fs::read(entry.path()).unwrap_or_default());
        }
    }
    bytes
}

/// Every row of the identity and audit tables as text.
async fn identity_tables(url: &str) -> String {
    use sea_orm::{ConnectionTrait, Database, Statement};
    if let Some(path) = url
        .strip_prefix("sqlite://")
        .and_then(|rest| rest.split('?').next())
    {
        let path = std::path::Path::new(path);
        let stem = path
            .file_name()
            .expect("a file")
            .to_string_lossy()
            .into_owned();
        let bytes = files_starting_with(path.parent().expect("a directory"), &stem);
        return String::from_utf8_lossy(&bytes).into_owned();
    }
    let db = Database::connect(url).await.expect("PostgreSQL");
    let mut text = String::new();
    for table in ["users", "sessions", "refresh_tokens", "api_tokens", "audit"] {
        let rows = db
            .query_all_raw(Statement::from_string(
                db.get_database_backend(),
                format!("SELECT t::text AS row FROM {table} t"),
            ))
            .await
            .expect("a query");
        for row in rows {
            text.push_str(&row.try_get::<String>("", "row").expect("text"));
            text.push('\n');
        }
    }
    text
}

async fn every_change_and_refusal_is_audited_with_who_what_where_and_never_a_secret(
    backend: Backend,
) {
    let site = site(backend, false, &[]).await;
    let admin = site.admin();
    let created = admin
        .post_json(
            "/api/v1/users",
            &json!({"name": "olga", "password": PASSWORD, "role": "operator"}).to_string(),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let request_id = created.headers["x-request-id"]
        .to_str()
        .expect("text")
        .to_owned();
    let wrong = site
        .anonymous()
        .post_json(
            "/api/v1/auth/login",
            &json!({"username": "olga", "password": "not-her-password"}).to_string(),
        )
        .await;
    assert_unauthorized(&wrong);
    let olga = site.anonymous().login("olga", PASSWORD).await;
    let token = olga
        .post_json("/api/v1/tokens", r#"{"name": "ci"}"#)
        .await
        .json();
    let secret = token["token"].as_str().expect("a secret").to_owned();
    let submitted = site
        .anonymous()
        .with_bearer(secret.clone())
        .post_json(
            "/api/v1/jobs",
            r#"{"command": "true", "env": {"PASSWORD": "job-secret-1234"}}"#,
        )
        .await;
    assert_eq!(submitted.status, StatusCode::ACCEPTED);
    let job = submitted.json()["id"].as_str().expect("an id").to_owned();
    assert_problem(&olga.get("/api/v1/users").await, StatusCode::FORBIDDEN);

    let user_create = audited(&admin, "action=user.create", 1).await;
    let record = &user_create[0];
    assert_eq!(record["principal"], "admin");
    assert_eq!(record["via"], "password");
    assert_eq!(record["resource"], "user/olga");
    assert_eq!(record["outcome"], "success");
    assert_eq!(record["status"], 201);
    assert_eq!(record["client"], "127.0.0.1");
    assert_eq!(record["request_id"], request_id.as_str());
    assert_eq!(record["trace_id"].as_str().map(str::len), Some(32));
    let logins = audited(&admin, "action=auth.login&principal=olga", 2).await;
    let outcomes: HashSet<&str> = logins
        .iter()
        .filter_map(|r| r["outcome"].as_str())
        .collect();
    assert_eq!(outcomes, HashSet::from(["success", "failure"]));
    let submit = audited(&admin, &format!("resource=job/{job}"), 1).await;
    assert_eq!(
        (
            submit[0]["action"].clone(),
            submit[0]["principal"].clone(),
            submit[0]["via"].clone(),
            submit[0]["token"].clone()
        ),
        (
            json!("job.submit"),
            json!("olga"),
            json!("token"),
            json!("ci")
        )
    );
    audited(&admin, "action=token.create&principal=olga", 1).await;
    let denied = audited(&admin, "action=auth.denied&principal=olga", 1).await;
    assert_eq!(denied[0]["outcome"], "denied");
    // Newest first, keyset pages without overlap.
    let first = admin.get("/api/v1/audit?limit=2").await.json();
    let cursor = first["next_cursor"].as_str().expect("more pages");
    let next = admin
        .get(&format!("/api/v1/audit?limit=2&cursor={cursor}"))
        .await
        .json();
    let ids: Vec<&str> = first["records"]
        .as_array()
        .expect("records")
        .iter()
        .chain(next["records"].as_array().expect("records"))
        .filter_map(|r| r["id"].as_str())
        .collect();
    let mut sorted = ids.clone();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    sorted.dedup();
    assert_eq!(ids, sorted, "newest first, no repeats");
    let bad = assert_problem(
        &admin.get("/api/v1/audit?action=job.explode").await,
        StatusCode::BAD_REQUEST,
    );
    assert_eq!(bad["field"], "action");

    // Each record is on its JetStream subject too.
    let js = async_nats::jetstream::new(site.cluster.client().await);
    let mut stream = js
        .get_stream("CAPSTAN_AUDIT")
        .await
        .expect("the audit stream");
    let last = stream
        .get_last_raw_message_by_subject("capstan.audit.user.create")
        .await
        .expect("a user.create record");
    assert!(!last.payload.is_empty());
    let info = stream.info().await.expect("info");
    assert!(info.state.messages >= 6, "{:?}", info.state);

    // No secret anywhere: not in the audit trail, the tables, the API's log.
    let everything = format!(
        "{}\n{}\n{}",
        serde_json::to_string(&audit(&admin, "").await).expect("JSON"),
        identity_tables(site.db.url()).await,
        site.cluster.process_log("api-1"),
    );
    for needle in [
        PASSWORD,
        "not-her-password",
        capstan_api::TEST_ADMIN_PASSWORD,
        secret.as_str(),
        &secret[4..],
        access_token(&olga).as_str(),
        "job-secret-1234",
    ] {
        assert!(!everything.contains(needle), "`{needle}` leaked");
    }
    assert!(
        everything.contains("$argon2id$"),
        "passwords are kept as Argon2id hashes"
    );

    // An action whose record cannot be stored is not reported done.
    let mut cluster = site.cluster;
    cluster.nats.kill();
    let refused = admin
        .post_json(
            "/api/v1/users",
            &json!({"name": "late", "password": PASSWORD, "role": "viewer"}).to_string(),
        )
        .await;
    assert!(!refused.status.is_success(), "{}", refused.text());
    drop(site.db);
}

async fn brute_force_and_hostile_input_get_precise_refusals_and_the_api_keeps_serving(
    backend: Backend,
) {
    let site = site(backend, false, &[]).await;
    let admin = site.admin();
    let anonymous = site.anonymous();
    let attempts = 10_000usize;
    let mut statuses = futures::stream::iter(0..attempts)
        .map(|n| {
            let anonymous = anonymous.clone();
            async move {
                let reply = anonymous
                    .post_json(
                        "/api/v1/auth/login",
                        &json!({"username": "admin", "password": format!("guess-{n}")}).to_string(),
                    )
                    .await;
                let retry_after = reply
                    .headers
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<u64>().ok());
                (reply.status, retry_after)
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
    statuses.sort_by_key(|(status, _)| status.as_u16());
    let wrong = statuses
        .iter()
        .filter(|(s, _)| *s == StatusCode::UNAUTHORIZED)
        .count();
    let locked = statuses
        .iter()
        .filter(|(s, r)| *s == StatusCode::TOO_MANY_REQUESTS && r.is_some_and(|r| r >= 1))
        .count();
    assert_eq!(
        wrong + locked,
        attempts,
        "every attempt is 401, or 429 with Retry-After"
    );
    assert!(
        wrong <= 10,
        "{wrong} passwords were checked before the lockout"
    );
    // Locked out: even the right password waits, and is told how long.
    let locked_out = anonymous
        .post_json(
            "/api/v1/auth/login",
            &json!({"username": "admin", "password": capstan_api::TEST_ADMIN_PASSWORD}).to_string(),
        )
        .await;
    let body = assert_problem(&locked_out, StatusCode::TOO_MANY_REQUESTS);
    assert!(
        body["detail"].as_str().unwrap_or("").contains("retry in"),
        "{body}"
    );
    // The API keeps serving, and every attempt is in the audit trail.
    assert_eq!(admin.get("/api/v1/users/me").await.status, StatusCode::OK);
    let failed = audit(&admin, "action=auth.login&principal=admin&outcome=failure")
        .await
        .len();
    let limited = audit(&admin, "action=auth.rate_limited&principal=admin")
        .await
        .len();
    assert_eq!(
        failed + limited,
        attempts + 1,
        "{failed} failed, {limited} rate limited"
    );

    // Hostile bodies: a 5 MB user name, a role that does not exist, a malformed document.
    let huge = json!({"username": "u".repeat(5 * 1024 * 1024), "password": "x"}).to_string();
    assert_problem(
        &anonymous.post_json("/api/v1/auth/login", &huge).await,
        StatusCode::PAYLOAD_TOO_LARGE,
    );
    let root = assert_problem(
        &admin
            .post_json(
                "/api/v1/users",
                &json!({"name": "eve", "password": PASSWORD, "role": "root"}).to_string(),
            )
            .await,
        StatusCode::BAD_REQUEST,
    );
    assert_eq!(root["field"], "role");
    assert_problem(
        &anonymous
            .post_json("/api/v1/auth/login", "{\"username\": ")
            .await,
        StatusCode::BAD_REQUEST,
    );
    assert_eq!(admin.get("/api/v1/users").await.status, StatusCode::OK);
    audited(&admin, "outcome=failure&action=http.request", 1).await;
    drop(site.db);
}

async fn tokens_of_the_oidc_provider_are_verified_against_its_published_keys(backend: Backend) {
    let provider = OidcIssuer::start().await;
    let site = site(
        backend,
        true,
        &[
            ("CAPSTAN_OIDC_ISSUER", provider.issuer()),
            ("CAPSTAN_OIDC_AUDIENCE", "capstan".to_owned()),
            ("CAPSTAN_OIDC_ROLE_CLAIM", "groups".to_owned()),
            (
                "CAPSTAN_OIDC_ROLES",
                "capstan-ops=operator,capstan-admins=admin".to_owned(),
            ),
        ],
    )
    .await;
    let anonymous = site.anonymous();
    let as_token = |token: String| anonymous.with_bearer(token);
    let operator = as_token(
        provider
            .token(json!({"sub": "u-123", "aud": "capstan", "groups": ["staff", "capstan-ops"]})),
    );
    let me = operator.get("/api/v1/users/me").await.json();
    assert_eq!(
        (me["name"].clone(), me["role"].clone(), me["via"].clone()),
        (json!("oidc:u-123"), json!("operator"), json!("oidc"))
    );
    let submitted = operator
        .post_json("/api/v1/jobs", r#"{"command": "true"}"#)
        .await;
    assert_eq!(
        submitted.status,
        StatusCode::ACCEPTED,
        "{}",
        submitted.text()
    );
    let id = submitted.json()["id"].as_str().expect("an id").to_owned();
    let job = wait_until(
        "the provider's job to run",
        Duration::from_secs(30),
        || async {
            let job = operator.get(&format!("/api/v1/jobs/{id}")).await.json();
            (job["status"] == "succeeded").then_some(job)
        },
    )
    .await;
    assert_eq!(job["submitted_by"]["principal"], "oidc:u-123");
    assert_eq!(job["submitted_by"]["via"], "oidc");
    let admin = as_token(
        provider.token(json!({"sub": "boss", "aud": "capstan", "groups": "capstan-admins"})),
    );
    assert_eq!(
        admin.get("/api/v1/audit?limit=1").await.status,
        StatusCode::OK
    );

    // Refused: another audience, expired, not yet valid, no role, a key it did not publish,
    // and an HMAC token "signed" with its public key.
    let t = now();
    for (case, token, status) in [
        (
            "audience",
            provider.token(json!({"sub": "u", "aud": "other", "groups": ["capstan-ops"]})),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "expired",
            provider.token(
                json!({"sub": "u", "aud": "capstan", "exp": t - 120, "groups": ["capstan-ops"]}),
            ),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "not yet",
            provider.token(
                json!({"sub": "u", "aud": "capstan", "nbf": t + 600, "groups": ["capstan-ops"]}),
            ),
            StatusCode::UNAUTHORIZED,
        ),
        (
            "no role",
            provider.token(json!({"sub": "u", "aud": "capstan", "groups": ["staff"]})),
            StatusCode::FORBIDDEN,
        ),
    ] {
        let reply = as_token(token).get("/api/v1/users/me").await;
        assert_eq!(reply.status, status, "{case}: {}", reply.text());
    }
    let impostor = OidcIssuer::start().await;
    let forged = impostor.token(json!({"iss": provider.issuer(), "sub": "u", "aud": "capstan", "groups": ["capstan-admins"]}));
    assert_unauthorized(&as_token(forged).get("/api/v1/users/me").await);
    let confused = hs256(
        json!({"alg": "HS256", "kid": "key-1"}),
        &json!({"iss": provider.issuer(), "sub": "u", "aud": "capstan", "exp": t + 600, "groups": ["capstan-admins"]}),
        b"any-bytes-the-attacker-likes-even-the-public-key",
    );
    assert_unauthorized(&as_token(confused).get("/api/v1/users/me").await);

    // The provider rotates its key: tokens of the new key are accepted once fetched.
    let fetched = provider.key_fetches();
    provider.rotate();
    let rotated = as_token(
        provider.token(json!({"sub": "u-123", "aud": "capstan", "groups": ["capstan-ops"]})),
    );
    wait_until(
        "a token of the rotated key to be accepted",
        Duration::from_secs(30),
        || async { (rotated.get("/api/v1/users/me").await.status == StatusCode::OK).then_some(()) },
    )
    .await;
    assert!(provider.key_fetches() > fetched);
    // A provider's user owns no API token.
    assert_problem(
        &operator
            .post_json("/api/v1/tokens", r#"{"name": "x"}"#)
            .await,
        StatusCode::FORBIDDEN,
    );
    drop(site.db);
}

async fn rate_limits_answer_429_with_retry_after_per_principal(backend: Backend) {
    let site = site(
        backend,
        false,
        &[
            ("CAPSTAN_RATE_LIMIT", "2".to_owned()),
            ("CAPSTAN_RATE_LIMIT_BURST", "5".to_owned()),
        ],
    )
    .await;
    let admin = site.admin();
    let ada = admin
        .post_json(
            "/api/v1/users",
            &json!({"name": "ada", "password": PASSWORD, "role": "admin"}).to_string(),
        )
        .await;
    assert_eq!(ada.status, StatusCode::CREATED, "{}", ada.text());
    let mut limited = None;
    for _ in 0..20 {
        let reply = admin.get("/api/v1/users/me").await;
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            limited = Some(reply);
            break;
        }
    }
    let limited = limited.expect("the limit is reached within 20 requests");
    assert_problem(&limited, StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = limited.headers["retry-after"]
        .to_str()
        .expect("text")
        .parse()
        .expect("seconds");
    assert!(retry >= 1);
    // Another principal has its own allowance: a second administrator, made before the
    // first ran out, reads the audit trail meanwhile.
    let ada = site.anonymous().login("ada", PASSWORD).await;
    assert_eq!(ada.get("/api/v1/users/me").await.status, StatusCode::OK);
    let refused = audited(&ada, "action=auth.rate_limited&principal=admin", 1).await;
    assert_eq!(refused[0]["status"], 429);
    // And the first gets through again once the limit allows.
    wait_until(
        "the limit to let a request through again",
        Duration::from_secs(10),
        || async { (admin.get("/api/v1/users/me").await.status == StatusCode::OK).then_some(()) },
    )
    .await;
    drop(site.db);
}

async fn the_admin_purge_removes_finished_jobs_from_history_bucket_and_streams(backend: Backend) {
    let mut site = site(backend, true, &[]).await;
    let admin = site.admin();
    let mut finished = Vec::new();
    for n in 0..3 {
        let reply = admin
            .post_json(
                "/api/v1/jobs",
                &json!({"command": format!("echo {n}")}).to_string(),
            )
            .await;
        finished.push(reply.json()["id"].as_str().expect("an id").to_owned());
    }
    let running = admin
        .post_json("/api/v1/jobs", r#"{"command": "sleep 60"}"#)
        .await
        .json()["id"]
        .as_str()
        .expect("an id")
        .to_owned();
    for id in &finished {
        wait_until(
            &format!("{id} to be recorded"),
            Duration::from_secs(30),
            || async {
                // The list is the history's alone (a job's own events also show an end on
                // its way there).
                let page = admin
                    .get("/api/v1/jobs?status=succeeded&limit=500")
                    .await
                    .json();
                page["jobs"]
                    .as_array()?
                    .iter()
                    .any(|j| j["id"] == id.as_str())
                    .then_some(())
            },
        )
        .await;
    }
    let before = capstan_protocol::Timestamp::now()
        .plus(Duration::from_secs(1))
        .to_rfc3339();
    let olga = site.user("olga", "operator").await;
    let refused = assert_problem(
        &delete(&olga, &format!("/api/v1/jobs?finished_before={before}")).await,
        StatusCode::FORBIDDEN,
    );
    assert_eq!(refused["permission"], "jobs:purge");
    let bad = assert_problem(
        &delete(
            &admin,
            &format!("/api/v1/jobs?finished_before={before}&status=running"),
        )
        .await,
        StatusCode::BAD_REQUEST,
    );
    assert_eq!(bad["field"], "status");
    let purged = delete(&admin, &format!("/api/v1/jobs?finished_before={before}")).await;
    assert_eq!(purged.status, StatusCode::OK, "{}", purged.text());
    assert_eq!(
        purged.json(),
        json!({"purged": 3, "skipped": 0, "more": false})
    );
    let mesh = site.cluster.mesh().await;
    let js = async_nats::jetstream::new(site.cluster.client().await);
    for id in &finished {
        assert_problem(
            &admin.get(&format!("/api/v1/jobs/{id}")).await,
            StatusCode::NOT_FOUND,
        );
        assert!(mesh.jobs.get(id).await.expect("read").is_none());
        for (stream, subject) in [
            ("CAPSTAN_EVENTS", format!("capstan.events.jobs.{id}.>")),
            ("CAPSTAN_LOGS", format!("capstan.logs.{id}.*")),
        ] {
            let stream = js.get_stream(stream).await.expect("a stream");
            let info = stream
                .info_with_subjects(subject.clone())
                .await
                .expect("stream info")
                .try_collect_subjects()
                .await;
            assert!(info.is_empty(), "{subject} still holds {info:?}");
        }
    }
    let unfinished = admin.get(&format!("/api/v1/jobs/{running}")).await.json();
    assert!(
        ["pending", "running"].contains(&unfinished["status"].as_str().unwrap_or("")),
        "{unfinished}"
    );
    let record = audited(&admin, "action=job.purge", 1).await;
    assert!(
        record[0]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("purged 3")
    );

    // A rebuild asks for --yes, is audited, and does not bring purged jobs back.
    let rebuild = |yes: bool| {
        let mut command = std::process::Command::new(capstan_testkit::bin_path("capstan"));
        command.args(["history", "rebuild"]);
        if yes {
            command.arg("--yes");
        }
        let admin = capstan_mesh::identities::Identity::Admin;
        command
            .env("CAPSTAN_NATS_URL", site.cluster.nats.url())
            .env(
                "CAPSTAN_NATS_CREDS",
                site.cluster.identities().seed_file(&admin),
            )
            .env("CAPSTAN_DATABASE_URL", site.db.url())
            .env("CAPSTAN_LOG", "warn")
            .output()
            .expect("capstan runs")
    };
    let refused = rebuild(false);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--yes"));
    let done = rebuild(true);
    assert!(
        done.status.success(),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    for id in &finished {
        assert_problem(
            &admin.get(&format!("/api/v1/jobs/{id}")).await,
            StatusCode::NOT_FOUND,
        );
    }
    let rebuilt = audited(&admin, "action=history.rebuild", 1).await;
    assert_eq!(rebuilt[0]["via"], "cli");
    assert!(
        rebuilt[0]["principal"]
            .as_str()
            .unwrap_or("")
            .starts_with("cli:")
    );
    drop(site.db);
}

trait SubjectCounts {
    async fn try_collect_subjects(self) -> std::collections::HashMap<String, usize>;
}

impl SubjectCounts for async_nats::jetstream::stream::InfoWithSubjects {
    async fn try_collect_subjects(self) -> std::collections::HashMap<String, usize> {
        let mut counts = std::collections::HashMap::new();
        let mut subjects = self;
        while let Some(item) = subjects.next().await {
            if let Ok((subject, count)) = item {
                counts.insert(subject, count);
            }
        }
        counts
    }
}

async fn hosts_and_origins_outside_the_allow_list_are_refused(backend: Backend) {
    let site = site(backend, false, &[]).await;
    let admin = site.admin();
    let rebound = admin
        .send(
            Method::GET,
            "/api/v1/users/me",
            &[("host", "rebind.attacker.example:8080")],
            Vec::new(),
        )
        .await;
    assert_problem(&rebound, StatusCode::FORBIDDEN);
    let cross = admin
        .send(
            Method::GET,
            "/api/v1/users/me",
            &[("origin", "https://evil.example")],
            Vec::new(),
        )
        .await;
    assert_problem(&cross, StatusCode::FORBIDDEN);
    let preflight = admin
        .send(
            Method::OPTIONS,
            "/api/v1/jobs",
            &[
                ("origin", "https://evil.example"),
                ("access-control-request-method", "POST"),
            ],
            Vec::new(),
        )
        .await;
    assert!(
        preflight
            .headers
            .get("access-control-allow-origin")
            .is_none()
    );
    let refused = audited(&admin, "action=auth.host_refused", 2).await;
    assert!(refused.iter().any(|r| {
        r["detail"]
            .as_str()
            .unwrap_or("")
            .contains("rebind.attacker.example")
    }));

    // With an origin listed, browsers from it may call the API.
    let mut cluster = site.cluster;
    let listed = cluster
        .api_with(
            "api-cors",
            &[
                ("CAPSTAN_DATABASE_URL", site.db.url().to_owned()),
                (
                    "CAPSTAN_API_CORS_ORIGINS",
                    "https://ops.example.com".to_owned(),
                ),
                (
                    "CAPSTAN_API_ALLOWED_HOSTS",
                    "localhost,127.0.0.1".to_owned(),
                ),
                // As if behind a load balancer on this host.
                ("CAPSTAN_TRUSTED_PROXIES", "127.0.0.1".to_owned()),
            ],
        )
        .await;
    // A host listed without a port is served on any port, and a bare HTTP/1.0 request naming
    // it (the compose file's healthcheck) gets its answer.
    let raw = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let address = listed.trim_start_matches("http://").to_owned();
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("connects");
        stream
            .write_all(b"GET /readyz HTTP/1.0\r\nHost:localhost\r\n\r\n")
            .await
            .expect("writes");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.expect("reads");
        answer
    };
    assert!(
        raw.starts_with("HTTP/1.0 200") || raw.starts_with("HTTP/1.1 200"),
        "{raw}"
    );
    let ops = cluster.http(&listed);
    // Behind a trusted proxy, the client is the address it forwarded for.
    let forwarded = ops
        .anonymous()
        .with_bearer("not-a-jwt")
        .send(
            Method::GET,
            "/api/v1/users/me",
            &[("x-forwarded-for", "198.51.100.1, 203.0.113.7")],
            Vec::new(),
        )
        .await;
    assert_unauthorized(&forwarded);
    let id = forwarded.headers["x-request-id"]
        .to_str()
        .expect("text")
        .to_owned();
    let records = audited(&ops, "action=auth.unauthenticated", 1).await;
    let record = records
        .iter()
        .find(|r| r["request_id"] == id.as_str())
        .expect("the refusal's record");
    assert_eq!(record["client"], "203.0.113.7");
    let preflight = ops
        .send(
            Method::OPTIONS,
            "/api/v1/jobs",
            &[
                ("origin", "https://ops.example.com"),
                ("access-control-request-method", "POST"),
                (
                    "access-control-request-headers",
                    "authorization,content-type",
                ),
            ],
            Vec::new(),
        )
        .await;
    assert_eq!(
        preflight
            .headers
            .get("access-control-allow-origin")
            .and_then(|v| v.to_str().ok()),
        Some("https://ops.example.com"),
        "{:?}",
        preflight.headers
    );
    let call = ops
        .send(
            Method::GET,
            "/api/v1/users/me",
            &[("origin", "https://ops.example.com")],
            Vec::new(),
        )
        .await;
    assert_eq!(call.status, StatusCode::OK, "{}", call.text());
    drop(site.db);
}

async fn the_first_start_creates_one_admin_and_never_a_fixed_password(backend: Backend) {
    let mut cluster = Cluster::start().await;
    let db = database(backend).await;
    let no_password = || {
        vec![
            ("CAPSTAN_DATABASE_URL", db.url().to_owned()),
            ("CAPSTAN_ADMIN_PASSWORD", String::new()),
        ]
    };
    // Two replicas on an empty database: one creates the administrator.
    let (first, second) = {
        let first = cluster.api_with("api-1", &no_password()).await;
        let second = cluster.api_with("api-2", &no_password()).await;
        (first, second)
    };
    let logs = format!(
        "{}{}",
        cluster.process_log("api-1"),
        cluster.process_log("api-2")
    );
    let created = logs.matches("created the first administrator").count();
    assert_eq!(created, 1, "{logs}");
    let password = logs
        .split("password=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .map(|p| p.trim_matches('"').to_owned())
        .expect("the generated password in the log");
    assert!(password.len() >= 20);
    let anonymous = HttpClient::new(first.clone());
    for guess in ["admin", "password", "capstan", "changeme"] {
        let reply = anonymous
            .post_json(
                "/api/v1/auth/login",
                &json!({"username": "admin", "password": guess}).to_string(),
            )
            .await;
        assert_unauthorized(&reply);
    }
    let admin = anonymous.login("admin", &password).await;
    let users = admin.get("/api/v1/users").await.json();
    assert_eq!(users["users"].as_array().map(Vec::len), Some(1));
    assert!(
        !users.to_string().contains("argon2"),
        "no hash leaves the API: {users}"
    );
    let on_second = HttpClient::new(second).login("admin", &password).await;
    assert_eq!(
        on_second.get("/api/v1/users/me").await.status,
        StatusCode::OK
    );
    // A restart on the same database creates nothing and logs no password.
    cluster.kill9("api-1");
    let _third = cluster.api_with("api-3", &no_password()).await;
    assert!(!cluster.process_log("api-3").contains("password="));
    let bootstrap = audited(&on_second, "action=user.bootstrap", 1).await;
    assert_eq!(bootstrap.len(), 1, "one administrator was created");
}

async fn users_are_managed_by_admins_with_a_password_policy_and_a_last_admin_kept(
    backend: Backend,
) {
    let site = site(backend, false, &[]).await;
    let admin = site.admin();
    let create = |body: Value| {
        let admin = admin.clone();
        async move { admin.post_json("/api/v1/users", &body.to_string()).await }
    };
    let short = assert_problem(
        &create(json!({"name": "olga", "password": "short", "role": "operator"})).await,
        StatusCode::BAD_REQUEST,
    );
    assert_eq!(short["field"], "password");
    let name = assert_problem(
        &create(json!({"name": "oidc:olga", "password": PASSWORD, "role": "operator"})).await,
        StatusCode::BAD_REQUEST,
    );
    assert_eq!(name["field"], "name");
    assert_eq!(
        create(json!({"name": "olga", "password": PASSWORD, "role": "operator"}))
            .await
            .status,
        StatusCode::CREATED
    );
    assert_problem(
        &create(json!({"name": "olga", "password": PASSWORD, "role": "viewer"})).await,
        StatusCode::CONFLICT,
    );
    let listed = admin.get("/api/v1/users").await;
    assert!(
        !listed.text().contains("argon2") && !listed.text().contains("password"),
        "{}",
        listed.text()
    );
    assert_problem(
        &send_json(
            &admin,
            Method::PATCH,
            "/api/v1/users/nobody",
            json!({"disabled": true}),
        )
        .await,
        StatusCode::NOT_FOUND,
    );
    // The last enabled administrator stays one.
    assert_problem(
        &send_json(
            &admin,
            Method::PATCH,
            "/api/v1/users/admin",
            json!({"role": "viewer"}),
        )
        .await,
        StatusCode::CONFLICT,
    );
    assert_problem(
        &delete(&admin, "/api/v1/users/admin").await,
        StatusCode::CONFLICT,
    );

    // A user changes their own password; the old one stops working, and so do their tokens.
    let olga = site.anonymous().login("olga", PASSWORD).await;
    let change = |current: &str, new: &str| {
        let olga = olga.clone();
        let body = json!({"current_password": current, "new_password": new}).to_string();
        async move { olga.post_json("/api/v1/users/me/password", &body).await }
    };
    let wrong = assert_problem(
        &change("not-it-at-all", "another-long-password").await,
        StatusCode::FORBIDDEN,
    );
    assert_eq!(wrong["field"], "current_password");
    let weak = assert_problem(&change(PASSWORD, "short").await, StatusCode::BAD_REQUEST);
    assert_eq!(weak["field"], "new_password");
    assert_eq!(
        change(PASSWORD, "another-long-password").await.status,
        StatusCode::NO_CONTENT
    );
    assert_unauthorized(&olga.get("/api/v1/users/me").await);
    assert_unauthorized(
        &site
            .anonymous()
            .post_json(
                "/api/v1/auth/login",
                &json!({"username": "olga", "password": PASSWORD}).to_string(),
            )
            .await,
    );
    let olga = site
        .anonymous()
        .login("olga", "another-long-password")
        .await;
    // An API token cannot change its owner's password.
    let token = olga
        .post_json("/api/v1/tokens", r#"{"name": "t"}"#)
        .await
        .json();
    let machine = site
        .anonymous()
        .with_bearer(token["token"].as_str().expect("a secret"));
    assert_problem(
        &machine
            .post_json(
                "/api/v1/users/me/password",
                &json!({"current_password": "another-long-password", "new_password": "yet-another-password"}).to_string(),
            )
            .await,
        StatusCode::FORBIDDEN,
    );
    // An administrator's reset ends the user's sessions.
    let reset = send_json(
        &admin,
        Method::PATCH,
        "/api/v1/users/olga",
        json!({"password": "reset-by-the-admin"}),
    )
    .await;
    assert_eq!(reset.status, StatusCode::OK);
    assert_unauthorized(&olga.get("/api/v1/users/me").await);
    let updates = audited(&admin, "action=user.update&resource=user/olga", 1).await;
    assert!(
        updates[0]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("password reset")
    );
    drop(site.db);
}

async fn metrics_need_a_credential_unless_the_open_listener_is_configured(backend: Backend) {
    let port = capstan_testkit::server::free_port();
    let site = site(
        backend,
        false,
        &[("CAPSTAN_METRICS_LISTEN", format!("127.0.0.1:{port}"))],
    )
    .await;
    assert_unauthorized(&site.anonymous().get("/metrics").await);
    let vera = site.user("vera", "viewer").await;
    let metrics = vera.get("/metrics").await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(metrics.text().contains("capstan_"));
    let open = HttpClient::new(format!("http://127.0.0.1:{port}"));
    let scraped = wait_until(
        "the open metrics listener",
        Duration::from_secs(10),
        || async {
            open.try_get("/metrics")
                .await
                .ok()
                .filter(|r| r.status == StatusCode::OK)
        },
    )
    .await;
    assert!(scraped.text().contains("capstan_"));
    assert_eq!(open.get("/api/v1/jobs").await.status, StatusCode::NOT_FOUND);
    assert_eq!(
        open.get("/api/v1/users").await.status,
        StatusCode::NOT_FOUND
    );
    drop(site.db);
}
