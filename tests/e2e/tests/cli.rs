//! The `capstan` command as its users run it: a separate process against a running mesh
//! (registry, scheduler, executor and API, each a process of its own), logged in through its
//! stored login, with its output read from pipes and, for the live parts, from a
//! pseudo-terminal: `run` streams output while the job runs, exits with the job's code, and
//! cancels the job on Ctrl-C; tables fit the terminal and colour only there.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capstan_e2e::Cluster;
use capstan_testkit::wait_until;
use serde_json::{Value, json};

/// How long one `capstan` command may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// What a finished `capstan` command left.
struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", self.stdout, self.stderr))
    }

    #[track_caller]
    fn ok(&self) -> &Self {
        assert_eq!(
            self.code, 0,
            "stdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }
}

/// The `capstan` binary with a login file of its own.
struct Capstan {
    config: PathBuf,
    _dir: tempfile::TempDir,
}

impl Capstan {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        Self {
            config: dir.path().join("config").join("login.json"),
            _dir: dir,
        }
    }

    fn command(&self, args: &[&str]) -> std::process::Command {
        let mut command = std::process::Command::new(capstan_testkit::process::bin_path("capstan"));
        command
            .args(args)
            .env("CAPSTAN_CONFIG", &self.config)
            .env_remove("CAPSTAN_TOKEN")
            .env_remove("CAPSTAN_URL")
            .env_remove("NO_COLOR")
            .env("TERM", "xterm-256color");
        command
    }

    /// Runs `capstan args…` with `stdin` on its standard input and pipes for its output.
    async fn run(&self, args: &[&str], stdin: Option<&str>) -> Ran {
        self.run_with(self.command(args), stdin).await
    }

    async fn run_with(&self, command: std::process::Command, stdin: Option<&str>) -> Ran {
        let mut command = tokio::process::Command::from(command);
        command
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = command.spawn().expect("capstan starts");
        if let Some(input) = stdin {
            use tokio::io::AsyncWriteExt;
            let mut pipe = child.stdin.take().expect("stdin");
            pipe.write_all(input.as_bytes())
                .await
                .expect("stdin written");
        }
        let output = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
            .await
            .expect("capstan ends in time")
            .expect("capstan's output");
        Ran {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    async fn login(&self, base: &str, user: &str, password: &str) {
        self.run(
            &["login", "--url", base, "-u", user, "--password-stdin"],
            Some(&format!("{password}\n")),
        )
        .await
        .ok();
    }
}

/// A mesh of one registry, one scheduler, one executor (`exec-1`, two slots) and one API;
/// returns it with the API's URL.
async fn mesh() -> (Cluster, String) {
    mesh_with(&[]).await
}

async fn mesh_with(api_env: &[(&str, String)]) -> (Cluster, String) {
    let mut cluster = Cluster::start().await;
    cluster.registry("registry-1");
    cluster.scheduler("scheduler-1");
    cluster.executor("exec-1", 2, &[]);
    let base = cluster.api_with("api-1", api_env).await;
    cluster.wait_nodes_up(&["exec-1"]).await;
    (cluster, base)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_user_logs_in_and_runs_commands_through_the_fleet_as_if_they_ran_locally() {
    let (_cluster, base) = mesh().await;
    let capstan = Capstan::new();

    let denied = capstan.run(&["ls"], None).await;
    assert_eq!(denied.code, 1);
    assert!(
        denied.stderr.contains("capstan login"),
        "an error says what to do: {}",
        denied.stderr
    );

    capstan
        .login(&base, "admin", capstan_api::TEST_ADMIN_PASSWORD)
        .await;
    let mode = std::fs::metadata(&capstan.config)
        .expect("the login is stored")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the login file is its owner's only");
    let stored = std::fs::read_to_string(&capstan.config).expect("readable");
    assert!(
        !stored.contains(capstan_api::TEST_ADMIN_PASSWORD),
        "the password is not stored"
    );
    let me = capstan.run(&["whoami", "-o", "json"], None).await;
    assert_eq!(me.ok().json()["name"], "admin");

    // Output goes where the job wrote it, and the exit code is the job's.
    let failed = capstan
        .run(
            &[
                "run",
                "--",
                "sh",
                "-c",
                "echo to-out; echo to-err >&2; exit 7",
            ],
            None,
        )
        .await;
    assert_eq!(failed.code, 7, "{}", failed.stderr);
    assert_eq!(failed.stdout, "to-out\n");
    assert!(failed.stderr.contains("to-err"), "{}", failed.stderr);

    let upper = capstan
        .run(
            &["run", "--stdin", "--", "tr", "a-z", "A-Z"],
            Some("hello fleet\n"),
        )
        .await;
    assert_eq!(upper.ok().stdout, "HELLO FLEET\n");

    let shell = capstan
        .run(&["run", "--shell", "--", "echo", "$((6 * 7))"], None)
        .await;
    assert_eq!(shell.ok().stdout, "42\n");

    let timed_out = capstan
        .run(&["run", "--timeout", "1s", "--", "sleep", "30"], None)
        .await;
    assert_eq!(timed_out.code, 124, "a timeout exits as timeout(1) does");

    // A job file, then everything about the job.
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("job.yaml");
    std::fs::write(
        &file,
        "name: cli-yaml\nargv: [sh, -c, 'echo from-yaml']\nlabels: {}\nmetadata:\n  team: ops\n",
    )
    .expect("written");
    let submitted = capstan
        .run(
            &["submit", "-f", file.to_str().expect("utf-8"), "-o", "json"],
            None,
        )
        .await;
    let id = submitted.ok().json()["id"]
        .as_str()
        .expect("an id")
        .to_owned();
    let watched = capstan.run(&["watch", &id], None).await;
    assert!(
        watched.ok().stdout.contains("succeeded"),
        "{}",
        watched.stdout
    );
    let job = capstan.run(&["get", &id, "-o", "json"], None).await;
    let job = job.ok().json();
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["spec"]["name"], "cli-yaml");
    let shown = capstan.run(&["get", &id], None).await;
    assert!(
        shown.ok().stdout.contains("sh -c 'echo from-yaml'"),
        "{}",
        shown.stdout
    );
    let logs = capstan.run(&["logs", &id], None).await;
    assert_eq!(logs.ok().stdout, "from-yaml\n");
    let yaml = capstan.run(&["get", &id, "-o", "yaml"], None).await;
    assert!(
        yaml.ok().stdout.contains("status: succeeded"),
        "{}",
        yaml.stdout
    );
    let events = capstan.run(&["events", &id, "-o", "json"], None).await;
    let kinds: Vec<String> = events.ok().json()["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("succeeded"),
        "{kinds:?}"
    );
    let listed = capstan
        .run(&["ls", "--name", "cli-yaml", "-o", "json"], None)
        .await;
    let listed = listed.ok().json();
    assert_eq!(listed["jobs"].as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(listed["jobs"][0]["id"], id.as_str());
    let table = capstan.run(&["ls", "--status", "succeeded"], None).await;
    let table = &table.ok().stdout;
    assert!(table.starts_with("ID"), "{table}");
    assert!(table.contains(&id), "{table}");
    assert!(!table.contains('\u{1b}'), "no colour in a pipe: {table:?}");

    // `logs -f` follows a job from the start to its end.
    let detached = capstan
        .run(
            &[
                "run",
                "-d",
                "--",
                "sh",
                "-c",
                "echo one; sleep 1; echo two >&2; echo three",
            ],
            None,
        )
        .await;
    let followed_id = detached.ok().stdout.trim().to_owned();
    let followed = capstan.run(&["logs", "-f", &followed_id], None).await;
    assert_eq!(followed.ok().stdout, "one\nthree\n");
    assert!(followed.stderr.contains("two"), "{}", followed.stderr);

    // A bad job file is refused before anything is sent, saying why.
    std::fs::write(&file, "argv: [unclosed\n").expect("written");
    let bad = capstan
        .run(&["submit", "-f", file.to_str().expect("utf-8")], None)
        .await;
    assert_eq!(bad.code, 1);
    assert!(bad.stderr.contains("not valid YAML"), "{}", bad.stderr);
    // A job the API refuses: its problem, naming the field.
    std::fs::write(&file, "{\"argv\": []}").expect("written");
    let refused = capstan
        .run(&["submit", "-f", file.to_str().expect("utf-8")], None)
        .await;
    assert_eq!(refused.code, 1);
    assert!(refused.stderr.contains("argv"), "{}", refused.stderr);

    // Nodes: listed, cordoned and uncordoned.
    let nodes = capstan.run(&["nodes", "-o", "json"], None).await;
    assert_eq!(nodes.ok().json()["nodes"][0]["id"], "exec-1");
    let cordoned = capstan.run(&["cordon", "exec-1", "-o", "json"], None).await;
    assert_eq!(cordoned.ok().json()["availability"], "cordoned");
    let node = capstan.run(&["nodes", "exec-1"], None).await;
    assert!(node.ok().stdout.contains("cordoned"), "{}", node.stdout);
    let uncordoned = capstan
        .run(&["uncordon", "exec-1", "-o", "json"], None)
        .await;
    assert_eq!(uncordoned.ok().json()["availability"], "active");
    let systems = capstan.run(&["systems", "-o", "json"], None).await;
    assert_eq!(systems.ok().json()["systems"], json!([]));

    // Shell completions name the commands.
    let completions = capstan.run(&["completions", "bash"], None).await;
    assert!(
        completions.ok().stdout.contains("watch"),
        "completions list commands"
    );

    // Logging out ends the session on the server, not only here.
    let session: Value =
        serde_json::from_str(&std::fs::read_to_string(&capstan.config).expect("login"))
            .expect("JSON");
    let refresh = session["credential"]["refresh_token"]
        .as_str()
        .expect("a session")
        .to_owned();
    capstan.run(&["logout"], None).await.ok();
    assert!(!capstan.config.exists(), "the login is forgotten");
    let reuse = capstan_testkit::http::HttpClient::new(base.clone())
        .post_json(
            "/api/v1/auth/refresh",
            &json!({ "refresh_token": refresh }).to_string(),
        )
        .await;
    assert_eq!(
        reuse.status.as_u16(),
        401,
        "the session ended: {}",
        reuse.text()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_and_users_made_with_the_command_work_and_a_viewer_is_told_what_it_lacks() {
    let (_cluster, base) = mesh().await;
    let admin = Capstan::new();
    admin
        .login(&base, "admin", capstan_api::TEST_ADMIN_PASSWORD)
        .await;

    let created = admin
        .run(
            &["tokens", "create", "ci", "--expires-in", "1d", "-o", "json"],
            None,
        )
        .await;
    let created = created.ok().json();
    let token = created["token"].as_str().expect("the secret").to_owned();
    let token_id = created["id"].as_str().expect("an id").to_owned();
    let listed = admin.run(&["tokens", "ls"], None).await;
    assert!(listed.ok().stdout.contains(&token_id), "{}", listed.stdout);
    assert!(!listed.stdout.contains(&token), "lists never show a secret");

    // CAPSTAN_TOKEN, with no stored login.
    let scripted = Capstan::new();
    let mut whoami = scripted.command(&["whoami", "-o", "json", "--url", &base]);
    whoami.env("CAPSTAN_TOKEN", &token);
    let me = scripted.run_with(whoami, None).await;
    let me = me.ok().json();
    assert_eq!(me["via"], "token");
    assert_eq!(me["token"], "ci");

    admin.run(&["tokens", "revoke", &token_id], None).await.ok();
    let mut again = scripted.command(&["whoami", "--url", &base]);
    again.env("CAPSTAN_TOKEN", &token);
    let refused = scripted.run_with(again, None).await;
    assert_eq!(refused.code, 1);
    assert!(refused.stderr.contains("(401)"), "{}", refused.stderr);
    assert!(
        refused.stderr.contains("capstan login"),
        "{}",
        refused.stderr
    );

    // A viewer made with `users create` logs in and may look but not submit.
    let password = "viewer-password-1234";
    admin
        .run(
            &[
                "users",
                "create",
                "vera",
                "--role",
                "viewer",
                "--password-stdin",
            ],
            Some(&format!("{password}\n")),
        )
        .await
        .ok();
    let users = admin.run(&["users", "ls", "-o", "json"], None).await;
    assert!(
        users.ok().json()["users"]
            .as_array()
            .expect("users")
            .iter()
            .any(|u| u["name"] == "vera" && u["role"] == "viewer")
    );
    let viewer = Capstan::new();
    viewer.login(&base, "vera", password).await;
    viewer.run(&["ls"], None).await.ok();
    let submit = viewer.run(&["run", "--", "true"], None).await;
    assert_eq!(submit.code, 1);
    assert!(submit.stderr.contains("(403)"), "{}", submit.stderr);
    assert!(submit.stderr.contains("jobs:submit"), "{}", submit.stderr);

    admin
        .run(&["users", "update", "vera", "--disable"], None)
        .await
        .ok();
    let disabled = viewer.run(&["ls"], None).await;
    assert_eq!(
        disabled.code, 1,
        "a disabled user's session ends: {}",
        disabled.stdout
    );
    admin.run(&["users", "delete", "vera"], None).await.ok();
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_run_at_once_renew_an_expiring_session_once_and_all_succeed() {
    // Access tokens that are always within the renewal margin: every command renews, and
    // refresh tokens are single-use (presenting one twice ends the session).
    let (_cluster, base) = mesh_with(&[("CAPSTAN_ACCESS_TOKEN_TTL", "10s".to_owned())]).await;
    let capstan = Arc::new(Capstan::new());
    capstan
        .login(&base, "admin", capstan_api::TEST_ADMIN_PASSWORD)
        .await;
    let first = std::fs::read_to_string(&capstan.config).expect("login");
    let mut running = Vec::new();
    for _ in 0..6 {
        let capstan = Arc::clone(&capstan);
        running.push(tokio::spawn(async move {
            capstan.run(&["whoami", "-o", "json"], None).await
        }));
    }
    for ran in running {
        let ran = ran.await.expect("joined");
        assert_eq!(ran.ok().json()["name"], "admin");
    }
    let renewed = std::fs::read_to_string(&capstan.config).expect("login");
    assert_ne!(first, renewed, "the session was renewed and stored");
    capstan.run(&["ls"], None).await.ok();
}

/// A pseudo-terminal's output, read as it arrives.
struct Terminal {
    output: Arc<Mutex<Vec<u8>>>,
    closed: Arc<AtomicBool>,
}

impl Terminal {
    /// Starts `command` with its standard output and error on a new pseudo-terminal of
    /// `columns` columns.
    fn spawn(mut command: std::process::Command, columns: u16) -> (std::process::Child, Self) {
        let size = nix::pty::Winsize {
            ws_row: 40,
            ws_col: columns,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&size), None).expect("a pseudo-terminal");
        let out = pty.slave.try_clone().expect("slave");
        let err = pty.slave.try_clone().expect("slave");
        command
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = command.spawn().expect("capstan starts");
        // Only the child holds the terminal's slave side now: its exit ends the reads.
        drop(pty.slave);
        let output = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&output);
        let closed = Arc::new(AtomicBool::new(false));
        let ended = Arc::clone(&closed);
        let mut master = std::fs::File::from(pty.master);
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            // Linux answers EIO once the slave side has closed: that is the end.
            while let Ok(read) = master.read(&mut buffer) {
                if read == 0 {
                    break;
                }
                sink.lock()
                    .expect("lock")
                    .extend_from_slice(&buffer[..read]);
            }
            ended.store(true, Ordering::SeqCst);
        });
        (child, Self { output, closed })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().expect("lock")).into_owned()
    }
}

/// Waits for `child` to exit and returns its code.
async fn exit_code(child: &mut std::process::Child) -> i32 {
    wait_until("capstan to exit", COMMAND_TIMEOUT, || {
        let status = child.try_wait().expect("waitable");
        async move { status }
    })
    .await
    .code()
    .unwrap_or(-1)
}

#[tokio::test(flavor = "multi_thread")]
async fn on_a_terminal_run_streams_output_live_ctrl_c_cancels_the_job_and_tables_fit_and_colour() {
    let (cluster, base) = mesh().await;
    let capstan = Capstan::new();
    capstan
        .login(&base, "admin", capstan_api::TEST_ADMIN_PASSWORD)
        .await;

    let (mut child, terminal) = Terminal::spawn(
        capstan.command(&[
            "run",
            "--name",
            "cli-live",
            "--",
            "sh",
            "-c",
            "echo first-line; sleep 60; echo never-printed",
        ]),
        80,
    );
    // The first line arrives while the job still runs (it sleeps a minute after it).
    wait_until(
        "the first line on the terminal",
        Duration::from_secs(60),
        || {
            let text = terminal.text();
            async move { text.contains("first-line").then_some(()) }
        },
    )
    .await;
    assert!(
        child.try_wait().expect("waitable").is_none(),
        "still running"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("a pid")),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("interrupted");
    let code = exit_code(&mut child).await;
    let text = terminal.text();
    assert_eq!(code, 130, "a cancelled job exits 130: {text}");
    assert!(text.contains("cancelling job"), "{text}");
    assert!(!text.contains("never-printed"), "{text}");
    let http = cluster.http(&base);
    // The list is the history's, which follows the events a moment later.
    wait_until(
        "the job listed as cancelled",
        Duration::from_secs(30),
        || {
            let http = http.clone();
            async move {
                let list = http.get("/api/v1/jobs?name=cli-live").await.json();
                (list["jobs"][0]["status"] == "cancelled").then_some(())
            }
        },
    )
    .await;

    // `watch` draws a progress bar on a terminal while the jobs run.
    let mut ids = Vec::new();
    for _ in 0..3 {
        let detached = capstan.run(&["run", "-d", "--", "sleep", "2"], None).await;
        ids.push(detached.ok().stdout.trim().to_owned());
    }
    let mut watch = vec!["watch"];
    watch.extend(ids.iter().map(String::as_str));
    let (mut child, terminal) = Terminal::spawn(capstan.command(&watch), 80);
    assert_eq!(exit_code(&mut child).await, 0, "{}", terminal.text());
    wait_until("the terminal to close", Duration::from_secs(10), || {
        let closed = terminal.closed.load(Ordering::SeqCst);
        async move { closed.then_some(()) }
    })
    .await;
    let text = terminal.text();
    assert!(text.contains("/3 ended"), "a progress bar: {text:?}");
    for id in &ids {
        assert!(text.contains(id.as_str()), "{text}");
    }

    // A table on a narrow terminal fits it, in colour.
    for index in 0..3 {
        capstan
            .run(
                &[
                    "run",
                    "--name",
                    &format!("a-rather-long-job-name-that-would-not-fit-{index}"),
                    "--",
                    "true",
                ],
                None,
            )
            .await
            .ok();
    }
    let (mut child, terminal) = Terminal::spawn(capstan.command(&["ls"]), 60);
    assert_eq!(exit_code(&mut child).await, 0, "{}", terminal.text());
    // Reads may trail the exit by a moment.
    wait_until("the terminal to close", Duration::from_secs(10), || {
        let closed = terminal.closed.load(Ordering::SeqCst);
        async move { closed.then_some(()) }
    })
    .await;
    let text = terminal.text();
    assert!(
        text.starts_with("\u{1b}[1mID"),
        "a bold header first: {text:?}"
    );
    assert!(text.contains("cancelled"), "{text}");
    assert!(text.contains("\u{1b}["), "colours on a terminal: {text:?}");
    for line in text.lines() {
        let visible = capstan_client::output::strip_ansi(line).replace('\r', "");
        assert!(
            visible.chars().count() <= 60,
            "{visible:?} is wider than the 60-column terminal"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn schedules_and_workflows_are_made_followed_and_stopped_with_the_command() {
    let (_cluster, base) = mesh().await;
    let capstan = Capstan::new();
    capstan
        .login(&base, "admin", capstan_api::TEST_ADMIN_PASSWORD)
        .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let write = |name: &str, content: &str| {
        let file = dir.path().join(name);
        std::fs::write(&file, content).expect("written");
        file.to_str().expect("utf-8").to_owned()
    };

    // A schedule from a YAML file: listed, previewed, paused, resumed, run now, deleted.
    let schedule = write(
        "nightly.yaml",
        "name: nightly\ncron: \"0 3 * * *\"\ntimezone: Europe/Paris\njob:\n  argv: [/bin/true]\n",
    );
    let created = capstan
        .run(&["schedules", "create", "-f", &schedule], None)
        .await;
    assert!(
        created
            .ok()
            .stdout
            .starts_with("nightly created; next tick 20"),
        "{}",
        created.stdout
    );
    let listed = capstan.run(&["schedules", "ls"], None).await;
    let row = listed
        .ok()
        .stdout
        .lines()
        .find(|line| line.starts_with("nightly"))
        .unwrap_or_else(|| panic!("no row for the schedule: {}", listed.stdout))
        .to_owned();
    for column in ["0 3 * * *", "Europe/Paris", "active", "admin"] {
        assert!(row.contains(column), "{column} missing from {row}");
    }
    let next = capstan
        .run(&["schedules", "next", "nightly", "-n", "3"], None)
        .await;
    let ticks: Vec<&str> = next.ok().stdout.lines().collect();
    assert_eq!(ticks.len(), 3, "{}", next.stdout);
    // 03:00 in Paris is 01:00 or 02:00 UTC, a day apart.
    assert!(
        ticks
            .iter()
            .all(|tick| tick.ends_with(":00:00 UTC")
                && (tick.contains(" 01:") || tick.contains(" 02:"))),
        "{ticks:?}"
    );
    assert!(ticks.windows(2).all(|pair| pair[0] < pair[1]), "{ticks:?}");
    let change = write("change.yaml", "every: 90s\n");
    let updated = capstan
        .run(&["schedules", "update", "nightly", "-f", &change], None)
        .await;
    assert!(
        updated
            .ok()
            .stdout
            .starts_with("nightly updated; next tick 20"),
        "{}",
        updated.stdout
    );
    let changed = capstan
        .run(&["schedules", "get", "nightly", "-o", "json"], None)
        .await;
    let changed = changed.ok().json();
    assert_eq!(changed["every"], "90s", "{changed}");
    assert!(
        changed["cron"].is_null(),
        "`every` replaces `cron`: {changed}"
    );
    let back = write("back.yaml", "cron: \"0 3 * * *\"\n");
    capstan
        .run(&["schedules", "update", "nightly", "-f", &back], None)
        .await
        .ok();
    let paused = capstan.run(&["schedules", "pause", "nightly"], None).await;
    assert_eq!(paused.ok().stdout.trim_end(), "nightly paused");
    let shown = capstan
        .run(&["schedules", "get", "nightly", "-o", "json"], None)
        .await;
    assert_eq!(shown.ok().json()["paused"], true);
    let resumed = capstan.run(&["schedules", "resume", "nightly"], None).await;
    assert_eq!(resumed.ok().stdout.trim_end(), "nightly active");
    let triggered = capstan
        .run(&["schedules", "trigger", "nightly"], None)
        .await;
    let job = triggered.ok().stdout.trim_end().to_owned();
    wait_until(
        "the triggered run to succeed",
        Duration::from_secs(60),
        || async {
            let got = capstan.run(&["get", &job, "-o", "json"], None).await;
            (got.code == 0 && got.json()["status"] == "succeeded").then_some(())
        },
    )
    .await;
    let detail = capstan.run(&["schedules", "get", "nightly"], None).await;
    for field in [
        "0 3 * * *",
        "Europe/Paris",
        "/bin/true",
        "0 ran, 0 skipped, 0 missed",
    ] {
        assert!(
            detail.ok().stdout.contains(field),
            "{field} missing: {}",
            detail.stdout
        );
    }
    capstan
        .run(&["schedules", "delete", "nightly"], None)
        .await
        .ok();
    let gone = capstan.run(&["schedules", "get", "nightly"], None).await;
    assert_eq!(gone.code, 1, "{}", gone.stdout);
    assert!(gone.stderr.contains("nightly"), "{}", gone.stderr);
    let bad = write("bad.yaml", "- not\n- a mapping\n");
    let refused = capstan
        .run(&["schedules", "create", "-f", &bad], None)
        .await;
    assert_ne!(refused.code, 0);
    assert!(
        refused.stderr.contains("must hold one schedule"),
        "{}",
        refused.stderr
    );

    // A workflow followed to its end: the exit code says how it went, every step is shown.
    let passing = write(
        "pass.yaml",
        "name: release\nsteps:\n  - name: build\n    job: {argv: [/bin/true]}\n  \
         - name: ship\n    depends_on: [build]\n    job: {argv: [/bin/true]}\n",
    );
    let passed = capstan
        .run(&["workflows", "submit", "-f", &passing, "--wait"], None)
        .await;
    let out = &passed.ok().stdout;
    assert!(out.contains("succeeded"), "{out}");
    for step in ["build", "ship"] {
        let line = out
            .lines()
            .find(|line| line.starts_with(step))
            .unwrap_or_else(|| panic!("no row for step {step}: {out}"));
        assert!(line.contains("succeeded"), "{line}");
    }
    let failing = write(
        "fail.json",
        r#"{"name": "broken", "steps": [
            {"name": "fail", "job": {"argv": ["/bin/false"]}},
            {"name": "after", "depends_on": ["fail"], "job": {"argv": ["/bin/true"]}}]}"#,
    );
    let failed = capstan
        .run(
            &[
                "workflows",
                "submit",
                "-f",
                &failing,
                "--wait",
                "-o",
                "json",
            ],
            None,
        )
        .await;
    assert_eq!(failed.code, 1, "{}", failed.stderr);
    assert_eq!(failed.json()["status"], "failed");

    // A running workflow cancelled: its step is cancelled, and the list says so.
    let slow = write(
        "slow.yaml",
        "name: slow\nsteps:\n  - name: wait\n    job: {argv: [sleep, \"60\"]}\n",
    );
    let submitted = capstan
        .run(&["workflows", "submit", "-f", &slow], None)
        .await;
    let id = submitted.ok().stdout.trim_end().to_owned();
    wait_until("the step to run", Duration::from_secs(60), || async {
        let got = capstan
            .run(&["workflows", "get", &id, "-o", "json"], None)
            .await;
        (got.code == 0 && got.json()["steps"][0]["status"] == "running").then_some(())
    })
    .await;
    let cancelled = capstan.run(&["workflows", "cancel", &id], None).await;
    assert_eq!(cancelled.ok().stdout.trim_end(), format!("{id} cancelled"));
    let ended = wait_until("the workflow to end", Duration::from_secs(60), || async {
        let got = capstan
            .run(&["workflows", "get", &id, "-o", "json"], None)
            .await;
        let view = got.json();
        (view["status"] != "running").then_some(view)
    })
    .await;
    assert_eq!(ended["status"], "cancelled");
    assert_eq!(ended["steps"][0]["status"], "cancelled");
    let listed = capstan
        .run(&["workflows", "ls", "--status", "cancelled"], None)
        .await;
    let rows: Vec<&str> = listed.ok().stdout.lines().skip(1).collect();
    assert_eq!(rows.len(), 1, "{}", listed.stdout);
    assert!(
        rows[0].starts_with(&id) && rows[0].contains("slow"),
        "{rows:?}"
    );
    let all = capstan.run(&["workflows", "ls", "-o", "json"], None).await;
    assert_eq!(all.ok().json()["items"].as_array().map(Vec::len), Some(3));
}
