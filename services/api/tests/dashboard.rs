//! The dashboard over real HTTP, as a browser without a script would use it, against a real
//! nats-server and a real history database: cookies, CSRF tokens, the forms, what each role
//! is shown, the renewal of an expired session, logging out, and the live stream of changes.
//! The same pages in a real browser are the end-to-end suite's `dashboard` tests.

use std::collections::BTreeMap;
use std::time::Duration;

use capstan_store::testing::TestDatabase;
use capstan_testkit::http::serde_json_value::json;
use capstan_testkit::http::{HttpClient, Reply};
use capstan_testkit::{NatsServer, wait_until};
use http::{Method, StatusCode};
use tokio_util::sync::CancellationToken;

/// A nats-server, the registry, a scheduler and the API (no executor: jobs stay pending,
/// which is all these tests need).
struct Stack {
    _server: NatsServer,
    admin: HttpClient,
    shutdown: CancellationToken,
    _db: TestDatabase,
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn stack() -> Stack {
    let server = NatsServer::start().await;
    let shutdown = CancellationToken::new();
    tokio::spawn(capstan_registry::run(
        capstan_registry::Config::for_url(server.url()),
        shutdown.clone(),
    ));
    tokio::spawn(capstan_scheduler::run(
        capstan_scheduler::Config::for_url(server.url()),
        shutdown.clone(),
    ));
    let db = TestDatabase::sqlite();
    let config = capstan_api::Config::for_urls(server.url(), db.url());
    let running = capstan_api::start(config, shutdown.clone())
        .await
        .expect("the API starts");
    let admin = HttpClient::new(format!("http://{}", running.address))
        .login("admin", capstan_api::TEST_ADMIN_PASSWORD)
        .await;
    Stack {
        _server: server,
        admin,
        shutdown,
        _db: db,
    }
}

/// A browser without a script: a cookie jar and forms.
struct Browser {
    http: HttpClient,
    cookies: BTreeMap<String, String>,
}

impl Browser {
    fn new(stack: &Stack) -> Self {
        Self {
            http: stack.admin.anonymous(),
            cookies: BTreeMap::new(),
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn keep(&mut self, reply: &Reply) {
        for value in reply.headers.get_all("set-cookie") {
            let line = value.to_str().expect("ascii");
            let (pair, _) = line.split_once(';').unwrap_or((line, ""));
            let (name, value) = pair.split_once('=').expect("name=value");
            if value.is_empty() {
                self.cookies.remove(name);
            } else {
                self.cookies.insert(name.to_owned(), value.to_owned());
            }
        }
    }

    async fn get(&mut self, path: &str) -> Reply {
        let cookie = self.cookie_header();
        let reply = self
            .http
            .send(Method::GET, path, &[("cookie", &cookie)], Vec::new())
            .await;
        self.keep(&reply);
        reply
    }

    async fn post_form(
        &mut self,
        path: &str,
        fields: &[(&str, &str)],
        extra: &[(&str, &str)],
    ) -> Reply {
        let cookie = self.cookie_header();
        let body = serde_urlencoded::to_string(fields).expect("a form");
        let mut headers = vec![
            ("cookie", cookie.as_str()),
            ("content-type", "application/x-www-form-urlencoded"),
        ];
        headers.extend_from_slice(extra);
        let reply = self.http.send(Method::POST, path, &headers, body).await;
        self.keep(&reply);
        reply
    }

    fn csrf(&self) -> String {
        self.cookies
            .get("capstan_csrf")
            .cloned()
            .expect("a CSRF cookie")
    }

    async fn log_in(&mut self, user: &str, password: &str) -> Reply {
        let page = self.get("/ui/login").await;
        assert_eq!(page.status, StatusCode::OK);
        let csrf = self.csrf();
        self.post_form(
            "/ui/login",
            &[
                ("csrf", &csrf),
                ("username", user),
                ("password", password),
                ("next", ""),
            ],
            &[],
        )
        .await
    }
}

fn location(reply: &Reply) -> &str {
    reply
        .headers
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

async fn jobs_named(stack: &Stack, name: &str) -> usize {
    let reply = stack.admin.get(&format!("/api/v1/jobs?name={name}")).await;
    reply.json()["jobs"].as_array().map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_logs_in_with_cookies_no_script_can_read_and_is_sent_to_the_login_page_without_one()
 {
    let stack = stack().await;
    let mut browser = Browser::new(&stack);
    let refused = browser.get("/ui/jobs?status=failed").await;
    assert_eq!(refused.status, StatusCode::SEE_OTHER);
    assert_eq!(
        location(&refused),
        "/ui/login?next=%2Fui%2Fjobs%3Fstatus%3Dfailed"
    );
    assert_eq!(location(&browser.get("/").await), "/ui/jobs");
    // The icon every browser asks for is the dashboard's, not a refused API request.
    let icon = browser.get("/favicon.ico").await;
    assert_eq!(
        (icon.status, icon.content_type()),
        (StatusCode::OK, "image/svg+xml")
    );

    let page = browser.get("/ui/login").await;
    assert!(page.text().contains(r#"id="login""#), "{}", page.text());
    let policy = page.headers["content-security-policy"]
        .to_str()
        .expect("ascii");
    assert!(policy.contains("script-src 'self'") && policy.contains("frame-ancestors 'none'"));

    let wrong = browser.log_in("admin", "not the password").await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert!(wrong.text().contains(r#"role="alert""#), "{}", wrong.text());
    assert!(!browser.cookies.contains_key("capstan_session"));

    let logged_in = browser
        .log_in("admin", capstan_api::TEST_ADMIN_PASSWORD)
        .await;
    assert_eq!(
        logged_in.status,
        StatusCode::SEE_OTHER,
        "{}",
        logged_in.text()
    );
    assert_eq!(location(&logged_in), "/ui/jobs");
    let cookies: Vec<&str> = logged_in
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().expect("ascii"))
        .collect();
    for name in ["capstan_session=", "capstan_refresh=", "capstan_csrf="] {
        let cookie = cookies
            .iter()
            .find(|c| c.starts_with(name))
            .unwrap_or_else(|| panic!("{name} set: {cookies:?}"));
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
            "{cookie}"
        );
        assert!(
            !cookie.contains("Secure"),
            "served over plain HTTP: {cookie}"
        );
    }
    let jobs = browser.get("/ui/jobs").await;
    assert_eq!(jobs.status, StatusCode::OK);
    let html = jobs.text();
    for part in [
        r#"id="submit""#,
        r#"href="/ui/audit""#,
        r#"id="mesh""#,
        "NATS connected",
    ] {
        assert!(html.contains(part), "{part} missing from {html}");
    }

    // Behind a trusted proxy that says it was reached over TLS, the cookies are `Secure`.
    let behind = browser
        .post_form(
            "/ui/login",
            &[
                ("csrf", &browser.csrf()),
                ("username", "admin"),
                ("password", capstan_api::TEST_ADMIN_PASSWORD),
            ],
            &[("x-forwarded-proto", "https")],
        )
        .await;
    assert!(
        behind
            .headers
            .get_all("set-cookie")
            .iter()
            .all(|c| !c.to_str().expect("ascii").contains("Secure")),
        "a client that is not a trusted proxy cannot claim TLS"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_form_without_the_browsers_csrf_token_is_refused_and_changes_nothing() {
    let stack = stack().await;
    let mut browser = Browser::new(&stack);
    browser
        .log_in("admin", capstan_api::TEST_ADMIN_PASSWORD)
        .await;
    let csrf = browser.csrf();

    let missing = browser
        .post_form("/ui/jobs", &[("command", "true"), ("name", "forged")], &[])
        .await;
    assert_eq!(missing.status, StatusCode::FORBIDDEN);
    assert!(missing.text().contains("CSRF"), "{}", missing.text());
    let wrong = browser
        .post_form(
            "/ui/jobs",
            &[
                ("csrf", &format!("{csrf}x")),
                ("command", "true"),
                ("name", "forged"),
            ],
            &[],
        )
        .await;
    assert_eq!(wrong.status, StatusCode::FORBIDDEN);
    // From another site, even with the token, the guard refuses the origin.
    let cross = browser
        .post_form(
            "/ui/jobs",
            &[("csrf", &csrf), ("command", "true"), ("name", "forged")],
            &[("origin", "https://evil.example")],
        )
        .await;
    assert_eq!(cross.status, StatusCode::FORBIDDEN, "{}", cross.text());
    assert_eq!(jobs_named(&stack, "forged").await, 0);
    // The refusals are in the audit trail.
    let denied = stack
        .admin
        .get("/api/v1/audit?action=auth.denied")
        .await
        .json();
    let forged = denied["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter(|r| r["resource"] == "POST /ui/jobs")
        .count();
    assert!(forged >= 2, "{denied}");
    let foreign = stack
        .admin
        .get("/api/v1/audit?action=auth.host_refused")
        .await
        .json();
    assert!(
        foreign["records"]
            .as_array()
            .expect("records")
            .iter()
            .any(|r| r["resource"] == "POST /ui/jobs"),
        "{foreign}"
    );

    let submitted = browser
        .post_form(
            "/ui/jobs",
            &[
                ("csrf", &csrf),
                ("command", "echo from-the-form"),
                ("name", "real"),
                ("labels", "zone=eu"),
                ("timeout", "30"),
            ],
            &[],
        )
        .await;
    assert_eq!(
        submitted.status,
        StatusCode::SEE_OTHER,
        "{}",
        submitted.text()
    );
    let id = location(&submitted)
        .strip_prefix("/ui/jobs/")
        .expect("sent to the job's page")
        .to_owned();
    let job = stack.admin.get(&format!("/api/v1/jobs/{id}")).await.json();
    assert_eq!(job["spec"]["command"], "echo from-the-form");
    assert_eq!(job["spec"]["labels"], json!({"zone": "eu"}));
    assert_eq!(job["submitted_by"]["principal"], "admin");
    // The submission is audited as the REST call it is.
    let audit = stack
        .admin
        .get("/api/v1/audit?action=job.submit")
        .await
        .json();
    assert!(
        audit["records"]
            .as_array()
            .expect("records")
            .iter()
            .any(|r| r["resource"] == format!("job/{id}") && r["principal"] == "admin"),
        "{audit}"
    );
    let page = browser.get(&format!("/ui/jobs/{id}")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.text().contains("echo from-the-form"));
    assert!(
        page.text().contains(r#"id="cancel""#),
        "an unfinished job can be cancelled"
    );

    // A form the API refuses comes back with the API's reason.
    let refused = browser
        .post_form(
            "/ui/jobs",
            &[("csrf", &csrf), ("command", "true"), ("timeout", "soon")],
            &[],
        )
        .await;
    assert_eq!(refused.status, StatusCode::OK);
    assert!(
        refused
            .text()
            .contains("the timeout is a whole number of seconds")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_is_shown_no_action_it_cannot_take_and_the_api_refuses_it_anyway() {
    let stack = stack().await;
    let created = stack
        .admin
        .post_json(
            "/api/v1/users",
            &json!({"name": "vic", "password": "viewer-password-1", "role": "viewer"}).to_string(),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let id = stack
        .admin
        .post_json("/api/v1/jobs", &json!({"command": "true"}).to_string())
        .await
        .json()["id"]
        .as_str()
        .expect("an id")
        .to_owned();
    let mut viewer = Browser::new(&stack);
    assert_eq!(
        viewer.log_in("vic", "viewer-password-1").await.status,
        StatusCode::SEE_OTHER
    );
    let jobs = viewer.get("/ui/jobs").await.text();
    assert!(
        !jobs.contains(r#"id="submit""#) && !jobs.contains(r#"href="/ui/audit""#),
        "{jobs}"
    );
    let job = viewer.get(&format!("/ui/jobs/{id}")).await.text();
    assert!(
        !job.contains(r#"id="cancel""#) && !job.contains(r#"id="resubmit""#),
        "{job}"
    );
    let nodes = viewer.get("/ui/nodes").await.text();
    assert!(!nodes.contains(r#"class="drain""#) && !nodes.contains(r#"class="cordon""#));
    let audit = viewer.get("/ui/audit").await.text();
    assert!(
        audit.contains("audit:read"),
        "the API's refusal is shown: {audit}"
    );

    let csrf = viewer.csrf();
    let posted = viewer
        .post_form(
            "/ui/jobs",
            &[("csrf", &csrf), ("command", "true"), ("name", "by-viewer")],
            &[],
        )
        .await;
    assert!(posted.text().contains("jobs:submit"), "{}", posted.text());
    let cancel = viewer
        .post_form(&format!("/ui/jobs/{id}/cancel"), &[("csrf", &csrf)], &[])
        .await;
    assert!(cancel.text().contains("jobs:cancel"), "{}", cancel.text());
    assert_eq!(jobs_named(&stack, "by-viewer").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_access_token_is_renewed_once_for_requests_made_at_the_same_time() {
    let stack = stack().await;
    let mut browser = Browser::new(&stack);
    browser
        .log_in("admin", capstan_api::TEST_ADMIN_PASSWORD)
        .await;
    // An access token the API no longer takes, beside a good refresh token.
    browser
        .cookies
        .insert("capstan_session".into(), "expired.or.forged".into());
    let cookie = browser.cookie_header();
    let pages = futures::future::join_all((0..6).map(|_| {
        let (http, cookie) = (browser.http.clone(), cookie.clone());
        async move {
            http.send(Method::GET, "/ui/jobs", &[("cookie", &cookie)], Vec::new())
                .await
        }
    }))
    .await;
    let mut renewed = Vec::new();
    for page in &pages {
        assert_eq!(page.status, StatusCode::OK, "{}", page.text());
        browser.keep(page);
        renewed.push(browser.cookies["capstan_refresh"].clone());
    }
    renewed.dedup();
    assert_eq!(renewed.len(), 1, "one renewal shared by all: {renewed:?}");
    // The session is still alive: spending a refresh token twice would have ended it.
    assert_eq!(browser.get("/ui/nodes").await.status, StatusCode::OK);
    let reuse = stack
        .admin
        .get("/api/v1/audit?action=auth.refresh_reuse")
        .await
        .json();
    assert_eq!(reuse["records"], json!([]), "{reuse}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logging_out_ends_the_session_on_the_server_not_only_in_the_browser() {
    let stack = stack().await;
    let mut browser = Browser::new(&stack);
    browser
        .log_in("admin", capstan_api::TEST_ADMIN_PASSWORD)
        .await;
    let kept = browser.cookies.clone();
    let csrf = browser.csrf();
    let out = browser
        .post_form("/ui/logout", &[("csrf", &csrf)], &[])
        .await;
    assert_eq!(location(&out), "/ui/login");
    assert!(!browser.cookies.contains_key("capstan_session"));
    // Cookies copied before the logout are worth nothing now.
    browser.cookies = kept;
    let after = browser.get("/ui/jobs").await;
    assert_eq!(after.status, StatusCode::SEE_OTHER);
    assert!(location(&after).starts_with("/ui/login"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_page_hears_of_a_new_job_and_its_stream_is_closed_when_left() {
    let stack = stack().await;
    let mut browser = Browser::new(&stack);
    browser
        .log_in("admin", capstan_api::TEST_ADMIN_PASSWORD)
        .await;
    let anonymous = browser
        .http
        .send(Method::GET, "/ui/live", &[], Vec::new())
        .await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);

    let cookie = browser.cookie_header();
    let http = browser.http.clone();
    let listening = tokio::spawn(async move {
        http.read_stream_with("/ui/live", &[("cookie", &cookie)], |text| {
            text.contains("event: change")
        })
        .await
    });
    live_pages(&stack, 1).await;
    // Jobs are submitted until the stream (whose follower starts with its first page)
    // reports one of them.
    let ids = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    wait_until("a hint on the open page", Duration::from_secs(30), || {
        let (admin, done, ids) = (stack.admin.clone(), listening.is_finished(), ids.clone());
        async move {
            if done {
                return Some(());
            }
            let reply = admin
                .post_json("/api/v1/jobs", &json!({"command": "true"}).to_string())
                .await;
            let id = reply.json()["id"].as_str().expect("an id").to_owned();
            ids.lock().expect("not poisoned").push(id);
            None
        }
    })
    .await;
    let ids = ids.lock().expect("not poisoned").clone();
    let (status, text) = listening.await.expect("the reader");
    assert_eq!(status, StatusCode::OK);
    assert!(
        ids.iter().any(|id| text.contains(id.as_str())),
        "a hint names a submitted job: {text}"
    );
    assert!(text.contains(r#""topic":"job""#), "{text}");
    // The page has let its stream go: nothing is left open for it.
    live_pages(&stack, 0).await;
}

/// Waits until the API counts `count` dashboard pages with a live stream open.
async fn live_pages(stack: &Stack, count: u64) {
    let line = format!("capstan_dashboard_live_pages {count}\n");
    wait_until(
        &format!("{count} live pages"),
        Duration::from_secs(30),
        || async {
            stack
                .admin
                .get("/metrics")
                .await
                .text()
                .contains(&line)
                .then_some(())
        },
    )
    .await;
}
