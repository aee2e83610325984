//! The web dashboard (`/ui/…`) as people use it: a real headless Chromium
//! ([`capstan_e2e::browser`]) against a running mesh (registry, scheduler, executor and API,
//! each a process of its own). Users log in through the form, submit and cancel jobs, watch a
//! job's status and output change without reloading, drain and uncordon a node; a viewer is
//! shown no button it may not use; a form posted without its CSRF token is refused; and every
//! page is captured light and dark, wide and narrow, with no horizontal scrolling on a phone
//! and no WCAG 2.1 AA violation axe-core can find, and Tab first reaches the skip link.
//!
//! The first test checks only the harness (a `data:` page, no mesh). Statuses are the API's
//! names: a job's (`succeeded`, `running`, `cancelled`, …) and, on the nodes page, a node's
//! availability (`active`, `draining`, `drained`, …) in its `.status` cell.

use std::time::Duration;

use capstan_e2e::Cluster;
use capstan_e2e::browser::{Browser, DEADLINE, Key, NARROW, Theme, WIDE};
use capstan_testkit::http::HttpClient;
use capstan_testkit::wait_until;
use http::{Method, StatusCode};
use serde_json::json;

/// The password of the users the tests create (long enough for the default policy).
const PASSWORD: &str = "a-long-enough-password";

/// How long a job of these tests may take to reach a status.
const JOB_DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread")]
async fn the_browser_harness_reports_the_dark_theme_to_pages() {
    let page = "data:text/html,<title>harness</title><p>a page</p>";
    for theme in [Theme::Light, Theme::Dark] {
        let browser = Browser::open(theme, NARROW).await;
        browser.goto(page).await;
        let dark = browser
            .execute(
                "return window.matchMedia('(prefers-color-scheme: dark)').matches;",
                Vec::new(),
            )
            .await;
        assert_eq!(
            dark,
            json!(theme == Theme::Dark),
            "under the {} theme",
            theme.name()
        );
        let viewport = "return [window.innerWidth, window.innerHeight];";
        assert_eq!(
            browser.execute(viewport, Vec::new()).await,
            json!([NARROW.0, NARROW.1]),
            "the narrow viewport is a phone's"
        );

        let name = format!("harness-{}-narrow", theme.name());
        let path = capstan_e2e::browser::screenshots_dir().join(format!("{name}.png"));
        let _ = std::fs::remove_file(&path);
        assert_eq!(browser.screenshot(&name).await, path);
        assert_eq!(png_width(&path), NARROW.0, "{}", path.display());

        browser.set_size(WIDE).await;
        assert_eq!(
            browser.execute(viewport, Vec::new()).await,
            json!([WIDE.0, WIDE.1]),
            "the viewport follows the size set"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_accessibility_check_reports_what_a_broken_page_violates() {
    // Grey on white (about 1.6:1) and an input without a label; a clean page reports nothing.
    let broken = "data:text/html,<html lang=en><title>broken</title><main>\
                  <p style='color:%23ccc;background:%23fff'>faint</p><input id=x></main></html>";
    let clean = "data:text/html,<html lang=en><title>clean</title><main><h1>clean</h1>\
                 <label for=x>Name</label><input id=x></main></html>";
    let browser = Browser::open(Theme::Light, WIDE).await;
    browser.goto(broken).await;
    let violations = browser.accessibility().await;
    for rule in ["color-contrast", "label"] {
        assert!(
            violations
                .iter()
                .any(|line| line.starts_with(&format!("{rule} "))),
            "{rule} is not among {violations:#?}"
        );
    }
    browser.goto(clean).await;
    assert_eq!(browser.accessibility().await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_logs_in_submits_a_job_and_watches_it_succeed_with_its_output_live() {
    let (cluster, base) = mesh().await;
    add_user(&cluster, &base, "olga", "operator").await;
    let browser = Browser::open(Theme::Light, WIDE).await;

    // A wrong password is refused, saying so.
    fill_login(&browser, &base, "olga", "not-the-password").await;
    browser.wait_for("[role=alert]", DEADLINE).await;
    assert!(
        !browser.exists("form#logout").await,
        "a refused login shows no session\n{}",
        browser.describe().await
    );

    log_in(&browser, &base, "olga", PASSWORD).await;
    // The header: navigation for what an operator may see, and the mesh's health.
    for link in ["/ui/jobs", "/ui/nodes", "/ui/systems"] {
        assert!(
            browser.exists(&format!("a[href=\"{link}\"]")).await,
            "no link to {link}\n{}",
            browser.describe().await
        );
    }
    assert!(
        !browser.exists("a[href=\"/ui/audit\"]").await,
        "the audit trail is the administrators'"
    );
    let mesh = browser.wait_text("#mesh", |text| !text.is_empty()).await;
    assert!(!mesh.is_empty());

    let id =
        submit_from_the_form(&browser, "echo hello-from-the-browser; sleep 1; echo done").await;
    // Set on the page as it was first loaded: still there at the end if it never reloaded.
    browser
        .execute("window.__marker = 1; return null;", Vec::new())
        .await;
    browser
        .wait_text_within("#status", JOB_DEADLINE, |status| status == "succeeded")
        .await;
    let output = browser
        .wait_text("pre#output", |output| {
            output.contains("hello-from-the-browser") && output.contains("done")
        })
        .await;
    assert!(
        output.find("hello-from-the-browser") < output.find("done"),
        "the output is in order: {output}"
    );
    let marker = browser
        .execute("return window.__marker === 1;", Vec::new())
        .await;
    assert_eq!(
        marker,
        json!(true),
        "the job's page updated itself without being reloaded\n{}",
        browser.describe().await
    );

    browser.goto(&format!("{base}/ui/jobs")).await;
    browser
        .wait_text(&format!("tr[data-job=\"{id}\"] .status"), |status| {
            status == "succeeded"
        })
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_running_job_is_cancelled_from_its_page() {
    let (cluster, base) = mesh().await;
    add_user(&cluster, &base, "olga", "operator").await;
    let browser = Browser::open(Theme::Light, WIDE).await;
    log_in(&browser, &base, "olga", PASSWORD).await;

    let id = submit_from_the_form(&browser, "sleep 60").await;
    browser
        .wait_text_within("#status", JOB_DEADLINE, |status| status == "running")
        .await;
    browser.click("form#cancel button").await;
    browser
        .wait_text_within("#status", Duration::from_secs(30), |status| {
            status == "cancelled"
        })
        .await;
    let job = cluster.http(&base).get(&format!("/api/v1/jobs/{id}")).await;
    assert_eq!(job.json()["status"], "cancelled", "{}", job.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_is_drained_from_the_nodes_page() {
    let (cluster, base) = mesh().await;
    let admin = cluster.http(&base);
    let browser = Browser::open(Theme::Light, WIDE).await;
    log_in(&browser, &base, "admin", capstan_api::TEST_ADMIN_PASSWORD).await;

    browser.goto(&format!("{base}/ui/nodes")).await;
    let row = "tr[data-node=\"exec-1\"]";
    browser.wait_for(row, DEADLINE).await;
    browser
        .wait_text(&format!("{row} .status"), |status| status == "active")
        .await;

    // No deadline given: the node holds nothing, so it drains at once.
    browser.click(&format!("{row} form.drain button")).await;
    browser
        .wait_text(&format!("{row} .status"), |status| {
            matches!(status, "draining" | "drained")
        })
        .await;
    let node = admin.get("/api/v1/nodes/exec-1").await;
    let availability = node.json()["availability"].clone();
    assert!(
        availability == "draining" || availability == "drained",
        "the API agrees: {}",
        node.text()
    );

    browser.click(&format!("{row} form.uncordon button")).await;
    browser
        .wait_text(&format!("{row} .status"), |status| status == "active")
        .await;
    let node = admin.get("/api/v1/nodes/exec-1").await;
    assert_eq!(node.json()["availability"], "active", "{}", node.text());
    assert_eq!(node.json()["status"], "up", "{}", node.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_schedule_is_paused_resumed_and_run_now_and_a_running_workflow_cancelled_from_their_pages()
 {
    let (cluster, base) = mesh().await;
    let admin = cluster.http(&base);
    nightly_schedule(&admin, json!({})).await;
    let browser = Browser::open(Theme::Light, WIDE).await;
    log_in(&browser, &base, "admin", capstan_api::TEST_ADMIN_PASSWORD).await;

    browser.goto(&format!("{base}/ui/schedules")).await;
    let row = "tr[data-schedule=nightly]";
    browser
        .wait_text(&format!("{row} .status"), |state| state == "active")
        .await;
    browser.click(&format!("{row} form.pause button")).await;
    browser
        .wait_text(&format!("{row} .status"), |state| state == "paused")
        .await;
    let paused = admin.get("/api/v1/schedules/nightly").await;
    assert_eq!(paused.json()["paused"], true, "{}", paused.text());
    browser.click(&format!("{row} form.resume button")).await;
    browser
        .wait_text(&format!("{row} .status"), |state| state == "active")
        .await;
    // Run now: the page that follows is the run's job, which succeeds.
    browser.click(&format!("{row} form.trigger button")).await;
    browser
        .wait_text_within("#status", JOB_DEADLINE, |status| status == "succeeded")
        .await;
    let url = browser.url().await;
    let job = job_id_in(&url).unwrap_or_else(|| panic!("not on a job's page: {url}"));
    let ran = admin.get(&format!("/api/v1/jobs/{job}")).await;
    assert_eq!(ran.json()["status"], "succeeded", "{}", ran.text());

    let body = json!({"name": "slow", "steps": [
        {"name": "wait", "job": {"argv": ["sleep", "60"]}},
        {"name": "after", "depends_on": ["wait"], "job": {"argv": ["/bin/true"]}}]});
    let workflow = created(&admin, "/api/v1/workflows", &body).await["id"]
        .as_str()
        .expect("an id")
        .to_owned();
    browser
        .goto(&format!("{base}/ui/workflows/{workflow}"))
        .await;
    browser
        .wait_text_within("tr[data-step=wait] .status", JOB_DEADLINE, |status| {
            status == "running"
        })
        .await;
    browser.click("form#cancel button").await;
    // The page refreshes itself as the step's job ends, and now and then.
    browser
        .wait_text_within("#status", JOB_DEADLINE, |status| status == "cancelled")
        .await;
    let ended = admin.get(&format!("/api/v1/workflows/{workflow}")).await;
    assert_eq!(ended.json()["status"], "cancelled", "{}", ended.text());
    assert!(
        !browser.exists("form#cancel").await,
        "an ended workflow offers no Cancel"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_viewer_follows_a_workflow_from_the_list_to_its_failed_step_and_that_steps_job() {
    let (cluster, base) = mesh().await;
    let admin = cluster.http(&base);
    let workflow = release_workflow(&admin).await;
    add_user(&cluster, &base, "vera", "viewer").await;
    let browser = Browser::open(Theme::Light, WIDE).await;
    log_in(&browser, &base, "vera", PASSWORD).await;

    browser.goto(&format!("{base}/ui/workflows")).await;
    let row = format!("tr[data-workflow=\"{workflow}\"]");
    let listed = browser.wait_text(&row, |text| !text.is_empty()).await;
    assert!(
        listed.contains("release") && listed.contains("1 of 2 succeeded, 1 failed"),
        "{listed}"
    );
    browser.click(&format!("{row} a")).await;
    browser.wait_for("tr[data-step=ship]", DEADLINE).await;
    let status = browser.wait_text("#status", |text| !text.is_empty()).await;
    assert_eq!(status, "failed");
    let ship = browser
        .wait_text("tr[data-step=ship]", |text| !text.is_empty())
        .await;
    assert!(ship.contains("failed") && ship.contains("build"), "{ship}");
    // The failed step's job is one click away.
    browser.click("tr[data-step=ship] a").await;
    let job_status = browser
        .wait_text_within("#status", DEADLINE, |text| !text.is_empty())
        .await;
    assert_eq!(job_status, "failed");
    assert!(
        job_id_in(&browser.url().await).is_some(),
        "not on a job's page: {}",
        browser.url().await
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_viewer_sees_no_button_it_cannot_use() {
    let (cluster, base) = mesh().await;
    add_user(&cluster, &base, "vic", "viewer").await;
    // A job still running, which its submitter (the administrator) could cancel.
    let id = submit_over_the_api(&cluster.http(&base), "sleep 60").await;
    let browser = Browser::open(Theme::Light, WIDE).await;
    log_in(&browser, &base, "vic", PASSWORD).await;

    let on_every_page = ["form#submit", "a[href=\"/ui/audit\"]"];

    browser
        .wait_for(&format!("tr[data-job=\"{id}\"]"), DEADLINE)
        .await;
    assert_absent(&browser, &on_every_page).await;

    browser.goto(&format!("{base}/ui/jobs/{id}")).await;
    browser
        .wait_text_within("#status", JOB_DEADLINE, |status| status == "running")
        .await;
    assert_absent(&browser, &on_every_page).await;
    assert_absent(&browser, &["form#cancel", "form#resubmit"]).await;

    browser.goto(&format!("{base}/ui/nodes")).await;
    browser.wait_for("tr[data-node=\"exec-1\"]", DEADLINE).await;
    assert_absent(&browser, &on_every_page).await;
    assert_absent(&browser, &["form.drain", "form.cordon", "form.uncordon"]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forged_form_post_without_the_csrf_token_is_refused() {
    let (cluster, base) = mesh().await;
    add_user(&cluster, &base, "olga", "operator").await;
    let admin = cluster.http(&base);
    let browser = Browser::open(Theme::Light, WIDE).await;
    log_in(&browser, &base, "olga", PASSWORD).await;

    // The browser posts the submit form with its token taken out.
    let forged = "echo forged-by-the-browser";
    browser
        .type_into("form#submit input[name=command]", forged)
        .await;
    let removed = browser
        .execute(
            "const token = document.querySelector('form#submit input[name=csrf]'); \
             if (!token) { return false; } token.remove(); return true;",
            Vec::new(),
        )
        .await;
    assert_eq!(
        removed,
        json!(true),
        "the submit form carries a CSRF token named `csrf`"
    );
    browser.click("form#submit button[type=submit]").await;
    wait_until("the refusal to be shown", DEADLINE, || async {
        let alert = browser.text("[role=alert]").await.unwrap_or_default();
        let body = browser.text("body").await.unwrap_or_default();
        (alert.contains("CSRF") || body.contains("403")).then_some(())
    })
    .await;
    assert_no_job_runs(&admin, "forged-by-the-browser").await;

    // The same by hand: the session's cookies, a token that is not the session's.
    browser.goto(&format!("{base}/ui/jobs")).await;
    browser.wait_for("form#submit", DEADLINE).await;
    let cookies = browser
        .client()
        .get_all_cookies()
        .await
        .expect("the session's cookies")
        .iter()
        .map(|cookie| format!("{}={}", cookie.name(), cookie.value()))
        .collect::<Vec<_>>()
        .join("; ");
    let plain = HttpClient::new(base.clone());
    let page = plain
        .send(Method::GET, "/ui/jobs", &[("cookie", &cookies)], "")
        .await;
    assert_eq!(
        page.status,
        StatusCode::OK,
        "the copied cookies are a session"
    );
    assert!(page.text().contains("id=\"submit\""), "{}", page.text());
    let refused = plain
        .send(
            Method::POST,
            "/ui/jobs",
            &[
                ("cookie", &cookies),
                ("content-type", "application/x-www-form-urlencoded"),
            ],
            "csrf=not-the-token&command=echo+forged-by-hand",
        )
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.text());
    assert_no_job_runs(&admin, "forged-by-hand").await;

    // The schedules' and workflows' actions are refused the same way, and change nothing.
    nightly_schedule(&admin, json!({})).await;
    let body =
        json!({"name": "slow", "steps": [{"name": "wait", "job": {"argv": ["sleep", "60"]}}]});
    let workflow = created(&admin, "/api/v1/workflows", &body).await["id"]
        .as_str()
        .expect("an id")
        .to_owned();
    for path in [
        "/ui/schedules/nightly/pause".to_owned(),
        "/ui/schedules/nightly/trigger".to_owned(),
        format!("/ui/workflows/{workflow}/cancel"),
    ] {
        let refused = plain
            .send(
                Method::POST,
                &path,
                &[
                    ("cookie", &cookies),
                    ("content-type", "application/x-www-form-urlencoded"),
                ],
                "csrf=not-the-token",
            )
            .await;
        assert_eq!(
            refused.status,
            StatusCode::FORBIDDEN,
            "{path}: {}",
            refused.text()
        );
    }
    let kept = admin.get("/api/v1/schedules/nightly").await;
    assert_eq!(kept.json()["paused"], false, "{}", kept.text());
    let runs = admin.get("/api/v1/jobs?schedule=nightly").await;
    assert_eq!(runs.json()["jobs"], json!([]), "{}", runs.text());
    let going = admin.get(&format!("/api/v1/workflows/{workflow}")).await;
    assert_eq!(going.json()["status"], "running", "{}", going.text());
    assert!(
        going.json()["cancel_requested_at"].is_null(),
        "{}",
        going.text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn every_page_is_captured_light_and_dark_wide_and_narrow() {
    let (cluster, base) = mesh().await;
    let admin = cluster.http(&base);
    let id = submit_over_the_api(&admin, "echo captured").await;
    wait_until("the captured job to succeed", JOB_DEADLINE, || async {
        let job = admin.get(&format!("/api/v1/jobs/{id}")).await;
        (job.json()["status"] == "succeeded").then_some(())
    })
    .await;
    let workflow = release_workflow(&admin).await;
    nightly_schedule(&admin, json!({"timezone": "Europe/Paris"})).await;

    // Each page, with what shows it has loaded.
    let pages = [
        (
            "jobs",
            "/ui/jobs".to_owned(),
            format!("tr[data-job=\"{id}\"]"),
        ),
        ("job", format!("/ui/jobs/{id}"), "#status".to_owned()),
        ("nodes", "/ui/nodes".to_owned(), "tr[data-node]".to_owned()),
        ("systems", "/ui/systems".to_owned(), "#mesh".to_owned()),
        (
            "schedules",
            "/ui/schedules".to_owned(),
            "tr[data-schedule=nightly]".to_owned(),
        ),
        (
            "workflows",
            "/ui/workflows".to_owned(),
            format!("tr[data-workflow=\"{workflow}\"]"),
        ),
        (
            "workflow",
            format!("/ui/workflows/{workflow}"),
            "tr[data-step=ship]".to_owned(),
        ),
        ("audit", "/ui/audit".to_owned(), "#mesh".to_owned()),
    ];
    let mut findings = Findings::default();
    for theme in [Theme::Light, Theme::Dark] {
        let browser = Browser::open(theme, WIDE).await;
        for (size, size_name) in [(WIDE, "wide"), (NARROW, "narrow")] {
            browser.set_size(size).await;
            browser.goto(&format!("{base}/ui/login")).await;
            browser.wait_for("form#login", DEADLINE).await;
            capture(&browser, "login", size_name, &mut findings).await;
        }
        browser.set_size(WIDE).await;
        log_in(&browser, &base, "admin", capstan_api::TEST_ADMIN_PASSWORD).await;
        for (page, path, loaded) in &pages {
            for (size, size_name) in [(WIDE, "wide"), (NARROW, "narrow")] {
                browser.set_size(size).await;
                browser.goto(&format!("{base}{path}")).await;
                browser.wait_for(loaded, DEADLINE).await;
                capture(&browser, page, size_name, &mut findings).await;
            }
        }
        if theme == Theme::Light {
            browser.set_size(WIDE).await;
            assert_tab_first_reaches_the_skip_link(&browser, &base).await;
        }
    }
    assert!(
        findings.overflowing.is_empty(),
        "pages wider than a {}-pixel phone (see target/screenshots/):\n{}",
        NARROW.0,
        findings.overflowing.join("\n")
    );
    assert!(
        findings.inaccessible.is_empty(),
        "WCAG 2.1 AA violations found by axe-core (see target/screenshots/):\n{}",
        findings.inaccessible.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_page_holds_one_live_stream_and_lets_it_go_when_left() {
    let (cluster, base) = mesh().await;
    let admin = cluster.http(&base);
    let browser = Browser::open(Theme::Light, WIDE).await;
    log_in(&browser, &base, "admin", capstan_api::TEST_ADMIN_PASSWORD).await;
    live_pages(&admin, 1).await;
    // Moving from page to page keeps one stream, never two.
    browser.goto(&format!("{base}/ui/nodes")).await;
    browser.wait_for("table#nodes", DEADLINE).await;
    live_pages(&admin, 1).await;
    browser.goto(&format!("{base}/ui/jobs")).await;
    browser.wait_for("table#jobs", DEADLINE).await;
    live_pages(&admin, 1).await;
    // The jobs page, left open, still shows a job submitted elsewhere.
    let id = submit_over_the_api(&admin, "true").await;
    browser
        .wait_text_within(
            &format!("tr[data-job=\"{id}\"] .status"),
            JOB_DEADLINE,
            |s| s == "succeeded",
        )
        .await;
    // Leaving the dashboard closes the stream.
    browser
        .goto("data:text/html,<title>elsewhere</title>")
        .await;
    live_pages(&admin, 0).await;
}

/// Waits until the API counts `count` dashboard pages with a live stream open.
async fn live_pages(admin: &HttpClient, count: u64) {
    let line = format!("capstan_dashboard_live_pages {count}\n");
    wait_until(
        &format!("{count} open live streams"),
        Duration::from_secs(30),
        || async {
            admin
                .get("/metrics")
                .await
                .text()
                .contains(&line)
                .then_some(())
        },
    )
    .await;
}

/// A mesh of one registry, one scheduler, one executor (`exec-1`, two slots) and one API;
/// returns it with the API's URL.
async fn mesh() -> (Cluster, String) {
    let mut cluster = Cluster::start().await;
    cluster.registry("registry-1");
    cluster.scheduler("scheduler-1");
    cluster.executor("exec-1", 2, &[]);
    let base = cluster.api("api-1").await;
    cluster.wait_nodes_up(&["exec-1"]).await;
    (cluster, base)
}

/// Creates the user `name` with `role` and [`PASSWORD`], as the administrator.
async fn add_user(cluster: &Cluster, base: &str, name: &str, role: &str) {
    let body = json!({"name": name, "password": PASSWORD, "role": role});
    let created = cluster
        .http(base)
        .post_json("/api/v1/users", &body.to_string())
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
}

/// Posts `body` to `path` as `http`, expects it created, and returns what was created.
async fn created(http: &HttpClient, path: &str, body: &serde_json::Value) -> serde_json::Value {
    let reply = http.post_json(path, &body.to_string()).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    reply.json()
}

/// Creates the schedule `nightly` (`/bin/true` at 03:00), with `more` fields, as `http`.
async fn nightly_schedule(http: &HttpClient, more: serde_json::Value) {
    let mut schedule = json!({"name": "nightly", "cron": "0 3 * * *",
        "job": {"argv": ["/bin/true"]}});
    if let (Some(schedule), Some(more)) = (schedule.as_object_mut(), more.as_object()) {
        schedule.extend(more.clone());
    }
    created(http, "/api/v1/schedules", &schedule).await;
}

/// Creates the workflow `release` (build, then ship), waits for its end, and returns its id.
async fn release_workflow(http: &HttpClient) -> String {
    let body = json!({"name": "release", "steps": [
        {"name": "build", "job": {"argv": ["/bin/true"]}},
        {"name": "ship", "depends_on": ["build"], "job": {"argv": ["/bin/false"]}}]});
    let id = created(http, "/api/v1/workflows", &body).await["id"]
        .as_str()
        .expect("an id")
        .to_owned();
    wait_until("the workflow to end", JOB_DEADLINE, || async {
        let view = http.get(&format!("/api/v1/workflows/{id}")).await;
        (view.json()["status"] == "failed").then_some(())
    })
    .await;
    id
}

/// Submits `command` through the API and returns the job's id.
async fn submit_over_the_api(http: &HttpClient, command: &str) -> String {
    let body = json!({"command": command});
    let reply = http.post_json("/api/v1/jobs", &body.to_string()).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
    reply.json()["id"].as_str().expect("an id").to_owned()
}

/// Opens the login page and posts the form with `name` and `password`.
async fn fill_login(browser: &Browser, base: &str, name: &str, password: &str) {
    browser.goto(&format!("{base}/ui/login")).await;
    browser
        .type_into("form#login input[name=username]", name)
        .await;
    browser
        .type_into("form#login input[name=password]", password)
        .await;
    browser.click("form#login button[type=submit]").await;
}

/// Logs in through the form and waits for the jobs page it lands on.
async fn log_in(browser: &Browser, base: &str, name: &str, password: &str) {
    fill_login(browser, base, name, password).await;
    browser.wait_url(|url| path_of(url) == "/ui/jobs").await;
    browser.wait_for("form#logout", DEADLINE).await;
}

/// Submits `command` with the jobs page's form and returns the id of the job whose page the
/// browser lands on.
async fn submit_from_the_form(browser: &Browser, command: &str) -> String {
    browser
        .type_into("form#submit input[name=command]", command)
        .await;
    browser.click("form#submit button[type=submit]").await;
    let url = browser.wait_url(|url| job_id_in(url).is_some()).await;
    browser.wait_for("#status", DEADLINE).await;
    job_id_in(&url).expect("a job's page").to_owned()
}

/// Panics, with what the page shows, if any of `selectors` matches.
async fn assert_absent(browser: &Browser, selectors: &[&str]) {
    for css in selectors {
        assert!(
            !browser.exists(css).await,
            "{css} is shown to a user who may not use it\n{}",
            browser.describe().await
        );
    }
}

/// Panics if the API knows a job whose command contains `marker`.
async fn assert_no_job_runs(admin: &HttpClient, marker: &str) {
    let list = admin.get("/api/v1/jobs").await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.text());
    let ids: Vec<String> = list.json()["jobs"]
        .as_array()
        .expect("a list of jobs")
        .iter()
        .filter_map(|job| job["id"].as_str().map(str::to_owned))
        .collect();
    for id in ids {
        let job = admin.get(&format!("/api/v1/jobs/{id}")).await;
        let command = job.json()["spec"]["command"].clone();
        assert!(
            !command.as_str().unwrap_or("").contains(marker),
            "a refused form still submitted a job: {}",
            job.text()
        );
    }
}

/// What the captures found wrong, each line naming the capture (`<page>-<theme>-<size>`).
#[derive(Default)]
struct Findings {
    /// Narrow pages that scroll sideways.
    overflowing: Vec<String>,
    /// axe-core's WCAG 2.1 AA violations.
    inaccessible: Vec<String>,
}

/// Writes `<page>-<theme>-<size>.png`; records the page's WCAG 2.1 AA violations and, on a
/// narrow viewport, whether it scrolls sideways.
async fn capture(browser: &Browser, page: &str, size: &str, findings: &mut Findings) {
    let name = format!("{page}-{}-{size}", browser.theme().name());
    browser.screenshot(&name).await;
    if size == "narrow" {
        let width = browser
            .execute("return document.documentElement.scrollWidth;", Vec::new())
            .await;
        if width
            .as_u64()
            .is_none_or(|width| width > u64::from(NARROW.0))
        {
            findings
                .overflowing
                .push(format!("{name}: scrollWidth {width}"));
        }
    }
    for violation in browser.accessibility().await {
        findings.inaccessible.push(format!("{name}: {violation}"));
    }
}

/// Opens the jobs page afresh and presses Tab once: the first thing focused must be the
/// "Skip to content" link, so that a keyboard user can pass the header.
async fn assert_tab_first_reaches_the_skip_link(browser: &Browser, base: &str) {
    browser.goto(&format!("{base}/ui/jobs")).await;
    browser.wait_for("table#jobs", DEADLINE).await;
    let focused = "const el = document.activeElement; \
                   return el ? el.tagName.toLowerCase() + (el.className ? '.' + el.className : '') \
                   : null;";
    let before = browser.execute(focused, Vec::new()).await;
    assert_eq!(
        before,
        json!("body"),
        "the jobs page focuses something before any key is pressed"
    );
    browser.press(Key::Tab).await;
    let skip = browser
        .execute(
            "return document.activeElement.matches('a.skip');",
            Vec::new(),
        )
        .await;
    let after = browser.execute(focused, Vec::new()).await;
    assert_eq!(
        skip,
        json!(true),
        "Tab on a fresh jobs page focused {after}, not the skip link a.skip\n{}",
        browser.describe().await
    );
}

/// The path of `url` (`http://host:port/ui/jobs?x#y` → `/ui/jobs`).
fn path_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let path = rest.find('/').map_or("", |start| &rest[start..]);
    path.split(['?', '#']).next().unwrap_or(path)
}

/// The job id in a job page's address (`/ui/jobs/<ULID>`).
fn job_id_in(url: &str) -> Option<&str> {
    let id = path_of(url).strip_prefix("/ui/jobs/")?;
    let ulid = id.len() == 26 && id.chars().all(|c| c.is_ascii_alphanumeric());
    ulid.then_some(id)
}

/// The width in the header of the PNG file at `path`.
fn png_width(path: &std::path::Path) -> u32 {
    let png = std::fs::read(path).expect("the screenshot is readable");
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 24,
        "{} is not a PNG",
        path.display()
    );
    u32::from_be_bytes([png[16], png[17], png[18], png[19]])
}
